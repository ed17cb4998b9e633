"""Sensitivity measurement for mixed precision: one calibration pass that records, for every *unit*
(what gets one precision: a fused q/k/v or gate/up group, or a single linear) and every candidate
(bits, group size), what quantizing it would cost and how much damage it does.

Recorded per unit and candidate (the real GPTQ/RTN perturbation ``ΔW = Ŵ − W`` on fp inputs):
  * ``‖ΔW‖²`` and HAWQ-V2's ``Ω = Tr(H)/n · ‖ΔW‖²`` (HAWQ-V2 eq. 3), with ``Tr(H)`` of the loss by
    Hutchinson (``calibration/trace.py``);
  * the layer-output error ``tr(ΔW H_x ΔWᵀ)``, ``H_x = 2XXᵀ/n`` (GPTQ eq. 1, what GPTQ minimises).
Recorded per unit: the loss increase ``ΔL_i`` when it alone is quantized to ``pair_bits``; per pair
of units at most ``pair_window`` decoder blocks apart: ``ΔL_ij``; their difference
``ΔL_ij − ΔL_i − ΔL_j`` is the inter-layer dependency (*Augmenting Hessians with Inter-Layer
Dependencies for Mixed-Precision PTQ*, §3), which layer-wise Hessians miss.

The result is one JSON file with the settings and a fingerprint of the model, reusable for any
budget and refused for another model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from quant.arch import Arch, decoder_layers
from quant.config import ConfigError, ModuleSpec, QuantConfig, check_bits, check_group_size
from quant.methods import get_method
from quant.packing import check_packable
from quant.quantizer import check_groupable, storage_bytes

from .capture import capture_layer_inputs, collect_hessians, run_layer
from .trace import grad_only, model_traces, window_loss

FORMAT = "hmq-sensitivity/1"
OBJECTIVES = ("hessian", "measured", "context", "output", "trace")
# ``context``: measured gains (negative changes) count at this fraction. Each unit's in-context gain
# includes the damage it does *together with* the others; widen several and that shared damage is
# counted once per unit. On SmolLM2 at 3.161 bpw: 1.0 -> 85.96, 0.725 (the share that makes the
# all-fp move exact) -> 81.47, 0.5 -> 75.26 held-out perplexity, uniform GPTQ 84.49.
CONTEXT_GAIN_SCALE = 0.5


class SensitivityError(ConfigError):
    """A measurement file is missing, corrupt, or belongs to another model."""


@dataclass(frozen=True)
class Candidate:
    bits: int  # 16 = keep in floating point
    group_size: int

    @property
    def label(self) -> str:
        return "fp16" if self.bits == 16 else f"w{self.bits}g{self.group_size}"


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. model.layers.3.self_attn.{q,k,v}_proj
    members: tuple[str, ...]  # full names of its linears
    layer: int
    kind: str  # name inside the layer, e.g. self_attn.qkv_proj or mlp.down_proj
    in_features: int
    out_features: int  # summed over members
    member_out: tuple[int, ...] = ()  # out_features of each member

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def build_units(model: nn.Module, arch: Arch, granularity: str = "fused") -> list[Unit]:
    """``fused``: a fused group (q/k/v, gate/up) is one unit, as inference engines run it as one
    matmul; ``linear``: every linear is its own unit (for engines that do not fuse)."""
    if granularity not in ("fused", "linear"):
        raise ConfigError(f"unit granularity {granularity!r} is unknown: use fused or linear.")
    units = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch.layers}.{i}."
        groups = [(n,) for n in arch.linears]
        if granularity == "fused":
            fused = {n: g for g in arch.fused for n in g}
            groups = list(dict.fromkeys(fused.get(n, (n,)) for n in arch.linears))
        for g in groups:
            lins = [layer.get_submodule(n) for n in g]
            if len(g) == 1:
                kind = g[0]
            else:
                head, _, _ = g[0].rpartition(".")
                kind = f"{head}.{'+'.join(n.rpartition('.')[2].removesuffix('_proj') for n in g)}"
            units.append(Unit(prefix + kind, tuple(prefix + n for n in g), i, kind, lins[0].in_features,
                              sum(lin.out_features for lin in lins), tuple(lin.out_features for lin in lins)))
    return units


def parse_candidates(items, group_size: int, keep: bool = True) -> list[Candidate]:
    """Candidates from bit widths at ``group_size`` (``3``) or explicit (bits, group size) pairs
    (``"3g-1"``: 3 bits, one group per output channel; ``"w2g64"``). For each width the
    ``group_size`` candidate comes first (it is the one ``pair_bits`` measures pairs at)."""
    cands = set()
    for item in items:
        text = str(item).strip().lower().removeprefix("w")
        b, sep, g = text.partition("g")
        try:
            bits, gs = int(b), (int(g) if sep else group_size)
        except ValueError:
            raise ConfigError(f"candidate {item!r} is not a bit width (3) or bits and group size (3g128, 3g-1 for "
                              "one group per output channel).") from None
        check_bits(bits, "candidate bits")
        cands.add(Candidate(16, -1) if bits == 16 else Candidate(bits, check_group_size(gs, f"candidate {item!r} group size")))
    if keep:
        cands.add(Candidate(16, -1))
    if not cands:
        raise ConfigError("no candidate bit widths: pass some of 2, 3, 4, 8 (and 16 to allow keeping a unit).")
    return sorted(cands, key=lambda c: (c.bits, c.group_size != group_size, c.group_size))


def fingerprint(model: nn.Module, units: list[Unit]) -> str:
    """SHA-256 of the units' names and shapes plus 4096 weights sampled from each (rounded to fp16,
    so loading the same checkpoint in another dtype matches)."""
    from quant.stream import stored_weight

    h = hashlib.sha256()
    h.update(str(getattr(model.config, "model_type", "")).encode())
    for u in units:
        for name in u.members:
            w = stored_weight(model, name)
            h.update(f"{name}:{tuple(w.shape)}".encode())
            flat = w.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096]
            h.update(sample.to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Sensitivity:
    model: str
    fingerprint: str
    settings: dict
    units: list[Unit]
    candidates: list[Candidate]
    cost: list[list[float]]  # (U, C) bytes; inf where a candidate cannot apply
    sqnorm: list[list[float]]  # (U, C) ‖ΔW‖²
    out_err: list[list[float]]  # (U, C) tr(ΔW H_x ΔWᵀ)
    hx_trace: list[float]  # (U,) tr(H_x)
    trace: list[float]  # (U,) Tr of the loss Hessian block (Hutchinson or Fisher)
    trace_se: list[float]
    base_loss: float  # mean NLL of the fp model on the loss windows
    single: list[float]  # (U,) measured ΔL with only this unit at pair_bits
    pairs: list[tuple[int, int, float]]  # measured ΔL_ij with both at pair_bits
    overhead_bytes: int  # everything outside the units, at 16 bits (embeddings, norms, lm_head)
    seconds: dict = field(default_factory=dict)
    # the same per member linear of a fused unit (q, k, v each have their own curvature)
    member_trace: list[list[float]] | None = None  # (U, M_u)
    member_trace_se: list[list[float]] | None = None
    member_sqnorm: list[list[list[float]]] | None = None  # (U, C, M_u)
    member_out_err: list[list[list[float]]] | None = None
    # measured ΔL with only this unit quantized, at every candidate width in ``single_bits`` (U, C);
    # None where not measured
    single_all: list[list[float | None]] | None = None
    # measured *in context*: with every unit at ``context`` (a candidate label), the loss change when
    # this one unit takes each candidate instead (U, C; 0 at ``context``), and the loss increase of
    # that all-``context`` model over fp
    context: str | None = None
    context_single: list[list[float | None]] | None = None
    context_dloss: float | None = None
    # with ``settings["context_method"] == "taylor"``: the in-context changes that were measured by a
    # forward pass (U, C; None where ``context_single`` holds the Taylor prediction)
    context_exact: list[list[float | None]] | None = None
    # the candidate label of every unit in the model the in-context changes were measured around, when
    # that model is not uniform (``context`` is then "mixed")
    context_anchor: list[str] | None = None

    # ---- file form ----------------------------------------------------------------------------

    @property
    def clip(self) -> bool:
        """Whether the candidates were quantized with range search (files from before it: no)."""
        return bool(self.settings.get("clip", False))

    @property
    def solver(self) -> dict[str, bool]:
        """How the candidates were solved: range search, column order and, with the order, static
        groups (files from before a setting existed were measured with it off)."""
        act = bool(self.settings.get("act_order", False))
        out = {"clip": self.clip, "act_order": act}
        if act:
            out["static_groups"] = bool(self.settings.get("static_groups", False))
            if out["static_groups"]:
                out["group_params"] = self.settings.get("group_params", "original")
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"format": FORMAT, **asdict(self)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=_json_default)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a measurement is an ordinary file
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        path = Path(path)
        if not path.is_file():
            raise SensitivityError(f"sensitivity file {str(path)!r} does not exist: make one with `hmq measure --out {path}`.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SensitivityError(f"{path} is not an hmq sensitivity file ({exc}); re-run `hmq measure`.") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise SensitivityError(f"{path} is not an {FORMAT} file; re-run `hmq measure` with this hmq version.")
        try:
            data["units"] = [Unit(**{**u, "members": tuple(u["members"]), "member_out": tuple(u.get("member_out", ()))})
                             for u in data["units"]]
            data["candidates"] = [Candidate(**c) for c in data["candidates"]]
            data["pairs"] = [tuple(p) for p in data["pairs"]]
            return cls(**data)
        except (TypeError, KeyError) as exc:
            raise SensitivityError(f"{path} is missing fields ({exc}); re-run `hmq measure`.") from None

    def check_model(self, model: nn.Module, arch: Arch) -> None:
        granularity = self.settings.get("granularity", "fused")
        units = build_units(model, arch, granularity)
        if [u.name for u in units] != [u.name for u in self.units] or fingerprint(model, units) != self.fingerprint:
            raise SensitivityError(
                f"the sensitivity file was measured on {self.model!r} (fingerprint {self.fingerprint[:12]}), "
                "not on this model: run `hmq measure` on this model first."
            )

    # ---- predicted damage -----------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k), dtype=float) for k in ("cost", "sqnorm", "out_err")}

    def pair_column(self) -> int | None:
        pb = self.settings.get("pair_bits")
        for c, cand in enumerate(self.candidates):
            if cand.bits == pb:
                return c
        return None

    def tables(self, objective: str = "hessian", pairs: bool = True,
               gain_scale: float = CONTEXT_GAIN_SCALE) -> tuple[np.ndarray, dict]:
        """Predicted loss increase per (unit, candidate) and pair corrections, for one objective:

        * ``trace`` (HAWQ-V2): ``½ · Tr(H)/n · ‖ΔW‖²`` — the loss Hessian taken as ``Tr(H)/n · I``;
        * ``output`` (additive output error, as exl2 ranks layers): ``s · tr(ΔW H_x ΔWᵀ)`` with one
          global ``s`` that makes the summed prediction equal the summed measured single-unit ``ΔL``
          (only the scale of the prediction depends on it, not the allocation);
        * ``hessian`` (default): the Kronecker-factored second-order term. With the loss Hessian of
          a linear ``H_W ≈ G ⊗ A`` (K-FAC; ``A = XXᵀ/n``, ``G`` the curvature w.r.t. its outputs)
          and ``G ≈ g·I``, ``Tr(H_W) = g · d_out · tr(A)``, so
          ``ΔL ≈ ½ · Tr(H_W)/d_out · tr(ΔW H_x ΔWᵀ)/tr(H_x)``: the trace sets how much the loss
          cares about this layer's output, ``H_x`` which input directions matter. For a fused unit
          the term is summed over its member linears, each with its own trace and rows (q and k
          matter far less per row than v). ``trace`` is summed per member the same way. Plus, for each
          measured pair, ``P_ij[a, b] = I_ij · √(D_i[a] D_j[b] / (D_i[p] D_j[p]))`` where
          ``I_ij = max(0, ΔL_ij − ΔL_i − ΔL_j)`` was measured at ``p = pair_bits``: exact at the
          measured point and scaled like a bilinear second-order cross term elsewhere.
          Where single-unit loss increases were measured at every width (``single_all``), each
          width's column is rescaled so that its summed prediction equals the summed measurement:
          the second-order model ranks units within a width, the measurement sets how much a
          width costs (a pure second-order term underestimates 2-bit damage several-fold);
        * ``measured``: the measured single-unit loss increases themselves (clamped at 0), with the
          calibrated ``hessian`` value where a width was not measured, plus the same pair terms.
        """
        if objective == "context":
            return self._context_table(gain_scale), {}
        a = self.arrays()
        n = np.array([u.params for u in self.units], dtype=float)[:, None]
        d_out = np.array([u.out_features for u in self.units], dtype=float)[:, None]
        # A block whose Hutchinson estimate is within noise of zero (or below it: a noisy estimate of a
        # curvature that is ≥ 0 near a minimum) is taken at its standard error, not at ≤ 0, so that
        # noise alone never makes a unit look free to quantize.
        tr = np.maximum(np.asarray(self.trace, dtype=float), np.asarray(self.trace_se, dtype=float))[:, None]
        hx = np.asarray(self.hx_trace, dtype=float)[:, None]
        per_member = self.member_trace is not None and objective in ("trace", "hessian", "measured")
        if per_member:  # each member linear with its own trace: a sum of per-member terms
            D = np.zeros_like(a["sqnorm"])
            for k, u in enumerate(self.units):
                for m, d_m in enumerate(u.member_out):
                    tr_m = max(self.member_trace[k][m], self.member_trace_se[k][m])
                    if objective == "trace":
                        err = np.array([row[m] for row in self.member_sqnorm[k]])
                        D[k] += 0.5 * tr_m / (d_m * u.in_features) * err
                    else:
                        err = np.array([row[m] for row in self.member_out_err[k]])
                        D[k] += 0.5 * tr_m / d_m * err / max(self.hx_trace[k], 1e-30)
        elif objective == "trace":
            D = 0.5 * tr / n * a["sqnorm"]
        elif objective == "output":
            D = a["out_err"].copy()
            c = self.pair_column()
            if c is not None and self.single and sum(self.single) > 0:
                D *= float(sum(self.single) / max(D[:, c].sum(), 1e-30))  # predicted total = measured total
        elif objective in ("hessian", "measured"):
            D = 0.5 * tr / d_out * a["out_err"] / np.maximum(hx, 1e-30)
        else:
            raise ConfigError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}.")
        if objective in ("hessian", "measured") and self.single_all is not None:
            M = np.array([[np.nan if v is None else v for v in row] for row in self.single_all], dtype=float)
            for col in range(D.shape[1]):
                ok = np.isfinite(M[:, col]) & np.isfinite(D[:, col])
                pred, meas = D[ok, col].sum(), np.maximum(M[ok, col], 0.0).sum()
                if ok.any() and pred > 1e-30 and meas > 0:
                    D[:, col] *= meas / pred
        # the pair terms scale with the second-order model (a measured single can be 0, and would
        # make the ratio below blow up)
        shape = np.nan_to_num(np.where(np.isfinite(a["cost"]), np.maximum(D, 0.0), 0.0), posinf=0.0)
        if objective == "measured" and self.single_all is not None:
            D = np.where(np.isfinite(M), np.maximum(M, 0.0), D)
        D = np.where(np.isfinite(a["cost"]), np.maximum(D, 0.0), np.inf)
        P: dict[tuple[int, int], np.ndarray] = {}
        c = self.pair_column()
        if objective in ("hessian", "measured") and pairs and c is not None:
            single = np.asarray(self.single)
            for i, j, lij in self.pairs:
                inter = lij - single[i] - single[j]
                denom = math.sqrt(max(shape[i, c] * shape[j, c], 1e-30))
                # Only super-additive (positive) interactions are credited. Measured on a few hundred
                # tokens, a negative interaction is mostly noise, and the ILP would exploit it: with
                # signed terms the SmolLM2 benchmark predicted a *negative* ΔNLL at 4.25 bpw and
                # measured 95 ppl.
                inter = max(inter, 0.0)
                P[(i, j)] = inter * np.sqrt(np.outer(shape[i], shape[j])) / denom
        return D, P

    def _context_table(self, gain_scale: float = CONTEXT_GAIN_SCALE) -> np.ndarray:
        """``context`` objective: the measured loss change of moving each unit alone from the
        all-``context`` model to each candidate (signed: a wider candidate lowers the loss), so the
        prediction is exact for that uniform model and first-order around it; candidates not
        measured are not allowed. Gains count at ``gain_scale`` (see ``CONTEXT_GAIN_SCALE``)."""
        if not 0 < gain_scale <= 1:
            raise ConfigError(f"--gain-scale {gain_scale} must be in (0, 1]: the share of each measured in-context "
                              "gain that counts (1 = as measured).")
        if self.context_single is None:
            raise ConfigError("this measurement has no in-context losses: re-run `hmq measure --context-bits 3` "
                              "to use --objective context.")
        D = np.array([[np.inf if v is None else v for v in row] for row in self.context_single], dtype=float)
        D = np.where(D < 0, gain_scale * D, D)
        return np.where(np.isfinite(np.asarray(self.cost, dtype=float)), D, np.inf)

    def offset(self, objective: str) -> float:
        """Constant added to the summed table: the all-``context`` model's loss increase."""
        return float(self.context_dloss or 0.0) if objective == "context" else 0.0


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def candidate_cost(unit: Unit, cand: Candidate, partial_groups: bool) -> float:
    """Exact storage bytes of the unit under ``cand``; ``inf`` when it cannot be grouped or packed."""
    if cand.bits == 16:
        return float(unit.params * 2)
    try:
        check_groupable(unit.in_features, cand.group_size, unit.name, partial_groups)
        check_packable(unit.in_features, cand.bits)
        check_packable(unit.out_features, cand.bits)
    except ValueError:
        return math.inf
    return float(storage_bytes(unit.out_features, unit.in_features, cand.bits, cand.group_size))


def unit_weight(model: nn.Module, unit: Unit) -> torch.Tensor:
    """The unit's member weights stacked along the output dimension, fp32: (out, in)."""
    return torch.cat([model.get_submodule(m).weight.detach().to(torch.float32) for m in unit.members])


def quantized_candidates(W: torch.Tensor, H: torch.Tensor, unit: Unit, candidates: list[Candidate], costs: list[float],
                         config: QuantConfig, method):
    """Yield (candidate index, dequantized fp32 weight (out, in)) for every quantized candidate that
    applies to ``unit`` (finite cost), each quantized from ``W`` by ``method`` with input Hessian ``H``."""
    for c, cand in enumerate(candidates):
        if cand.bits == 16 or not math.isfinite(costs[c]):
            continue
        spec = ModuleSpec(cand.bits, cand.group_size, config.sym)
        qw = method.fn(W, H if method.needs_hessian else None, spec, config, unit.name)
        yield c, qw.dequantize(torch.float32)


def member_weights(model: nn.Module, unit: Unit, W: torch.Tensor, dtype: torch.dtype = torch.float16
                   ) -> dict[str, torch.Tensor]:
    """Split a unit-shaped (out, in) weight back into its members, on the CPU in ``dtype``."""
    out, row = {}, 0
    for m in unit.members:
        rows = model.get_submodule(m).out_features
        out[m] = W[row : row + rows].to("cpu", dtype)
        row += rows
    return out


@contextlib.contextmanager
def _skip_layers(layers: nn.ModuleList, upto: int, outputs: list[torch.Tensor], as_tuple: bool):
    """Layers ``< upto`` return their cached outputs instead of computing them."""
    for k in range(upto):
        out = outputs[k]
        layers[k].forward = (lambda *a, _o=out, **kw: (_o,)) if as_tuple else (lambda *a, _o=out, **kw: _o)
    try:
        yield
    finally:
        for k in range(upto):
            del layers[k].forward


def _loss_from(model: nn.Module, layers: nn.ModuleList, outputs: list[torch.Tensor], as_tuple: bool,
               ids: torch.Tensor, start: int, swap: dict[str, torch.Tensor]) -> float:
    """Mean NLL on ``ids`` with ``swap``'s weights, layers ``< start`` replayed from ``outputs``."""
    with _skip_layers(layers, start, outputs, as_tuple), _swapped(model, swap):
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


@contextlib.contextmanager
def _swapped(model: nn.Module, weights: dict[str, torch.Tensor]):
    old = {}
    for name, w in weights.items():
        lin = model.get_submodule(name)
        old[name] = lin.weight.data
        lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)
    try:
        yield
    finally:
        for name, w in old.items():
            model.get_submodule(name).weight.data = w


@torch.no_grad()
def measure_sensitivity(model: nn.Module, arch: Arch, windows: torch.Tensor, loss_windows: torch.Tensor,
                        candidates: list[Candidate], config: QuantConfig, device: torch.device, *,
                        model_name: str = "", granularity: str = "fused", trace_method: str = "hutchinson",
                        trace_tol: float = 0.05, max_probes: int = 16, pair_bits: int | None = 3,
                        pair_window: int = 1, batch_size: int = 8, seed: int = 0, progress: bool = True,
                        settings: dict | None = None, single_bits: tuple[int, ...] | None = None,
                        context_bits: int | None = None, context_method: str = "exact",
                        context_exact_bits: tuple[int, ...] = (16,),
                        context_anchor: list[str] | None = None, sequential: bool = False) -> Sensitivity:
    """Measure everything :meth:`Sensitivity.tables` needs. ``windows`` (n, seq) feed ``H_x`` and
    the candidate quantizations; ``loss_windows`` (m, seq), a smaller set run as one batch, feed
    the Hessian traces and the measured single/pair loss increases. ``single_bits`` (default: every
    candidate width) are the widths at which each unit's own loss increase is measured; their
    quantized weights are held in fp16 on the CPU until then (one model copy per width).
    ``context_bits``: also measure every unit at every candidate *in context*, with all other units
    at that width (its default-group candidate), for ``--objective context``; this holds every
    candidate's weights (one fp16 model copy per candidate). ``context_method``: ``exact`` runs one
    pass per (unit, candidate); ``taylor`` runs one pass per unit and width in ``context_exact_bits``
    (16 = the fp weights) and predicts the rest from the gradient at the all-context model plus a
    per-unit curvature fitted to those passes (see :func:`_measure_in_context`).
    ``context_anchor`` (a candidate label per unit, e.g. an allocation chosen from an earlier
    measurement) replaces the uniform ``context_bits`` model as the point the in-context changes are
    measured around. ``sequential`` (with an anchor): each decoder layer's candidates are quantized on
    the inputs of the anchor model, with the layers in front quantized at their anchor candidates, as
    `hmq quantize` builds that model (else on fp inputs)."""
    t_all = time.perf_counter()
    secs: dict[str, float] = {}
    method = get_method(config.method)
    if method.affine:
        raise ConfigError(f"measure with --method gptq or rtn, not {config.method}: affine transforms are learned per "
                          "block at quantize time, after the allocation (quantize with --method "
                          f"{config.method} and a --sensitivity measured with gptq).")
    units = build_units(model, arch, granularity)
    widths = sorted({c.bits for c in candidates if c.bits != 16})  # quantized candidate widths
    if context_method not in ("exact", "taylor"):
        raise ConfigError(f"context method {context_method!r} is unknown: use exact or taylor.")
    if context_bits is not None and context_bits not in widths:
        raise ConfigError(f"--context-bits {context_bits} must be one of the candidate widths {widths}.")
    anchor = _context_anchor(units, candidates, context_bits, context_anchor)
    if sequential and anchor is None:
        raise ConfigError("sequential measurement quantizes each layer on the anchor model's inputs: give "
                          "context_bits or an anchor allocation with it.")
    if pair_bits is not None and pair_bits not in [c.bits for c in candidates]:
        raise ConfigError(f"pair_bits={pair_bits} must be one of the candidate widths {[c.bits for c in candidates]}.")
    cost = [[candidate_cost(u, c, config.partial_groups) for c in candidates] for u in units]
    unit_params = {m for u in units for m in u.members}
    overhead = sum(p.numel() * 2 for n, p in model.named_parameters() if n.removesuffix(".weight") not in unit_params)
    overhead += sum(model.get_submodule(m).bias.numel() * 2 for m in unit_params if model.get_submodule(m).bias is not None)
    U, C = len(units), len(candidates)
    sqnorm = [[0.0] * C for _ in range(U)]
    out_err = [[0.0] * C for _ in range(U)]
    m_sqnorm = [[[0.0] * len(u.members) for _ in range(C)] for u in units]
    m_out_err = [[[0.0] * len(u.members) for _ in range(C)] for u in units]
    hx_trace = [0.0] * U
    probe_weights: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (unit, candidate) -> member weights
    if single_bits is None:
        single_bits = tuple(widths)
    single_set = set(single_bits) | ({pair_bits} if pair_bits is not None else set())  # widths of fp-frame singles
    keep_bits = set(widths) if anchor is not None else single_set  # widths whose weights are held

    # 1) layer by layer on fp inputs (``sequential``: the anchor model's): H_x, and every candidate's real ΔW
    t0 = time.perf_counter()
    layers = decoder_layers(model, arch)
    inputs = capture_layer_inputs(model, layers, windows, device, batch_size)
    loss_in = capture_layer_inputs(model, layers, loss_windows, device, len(loss_windows))
    layer_outs: list[torch.Tensor] = []  # fp output of each layer on the loss windows
    as_tuple = False
    by_layer: dict[int, list[int]] = {}
    for k, u in enumerate(units):
        by_layer.setdefault(u.layer, []).append(k)
    for i in tqdm(range(len(layers)), desc="measure layers", disable=not progress, unit="layer"):
        layer = layers[i].to(device)
        prefix = f"{arch.layers}.{i}."
        hessians, _ = collect_hessians(layer, list(arch.linears), inputs, prefix, None, (), arch.shared_input)
        for k in by_layer[i]:
            u = units[k]
            W = unit_weight(model, u)  # (out, in)
            H = hessians[u.members[0].removeprefix(prefix)]
            for m in u.members[1:]:
                if hessians[m.removeprefix(prefix)] is not H:
                    raise ConfigError(f"{u.name}: its linears do not share one input, so they cannot be one unit; "
                                      "use --units linear.")
            hx_trace[k] = float(torch.diagonal(H).sum())
            for c, Wq in quantized_candidates(W, H, u, candidates, cost[k], config, method):
                dW = Wq - W  # (out, in)
                per_row = ((dW @ H) * dW).sum(1)  # (out,) row r: ΔW_r H ΔW_rᵀ
                sq_row = dW.pow(2).sum(1)
                row = 0
                for m, rows in enumerate(u.member_out):
                    m_out_err[k][c][m] = float(per_row[row : row + rows].sum())
                    m_sqnorm[k][c][m] = float(sq_row[row : row + rows].sum())
                    row += rows
                sqnorm[k][c] = float(sq_row.sum())
                out_err[k][c] = float(per_row.sum())  # tr(ΔW H ΔWᵀ)
                if candidates[c].bits in keep_bits:
                    probe_weights[(k, c)] = member_weights(model, u, W + dW)
        del hessians
        if i == 0:  # do decoder layers return a tuple or a tensor (transformers versions differ)?
            as_tuple = isinstance(layer(loss_in[0].hidden, **loss_in[0].kwargs), tuple)
        if sequential:  # the next layer's inputs come from the anchor model
            with _swapped(model, _anchor_weights(probe_weights, anchor, by_layer[i])):
                inputs = run_layer(layer, inputs)
        else:
            inputs = run_layer(layer, inputs)
        loss_in = run_layer(layer, loss_in)
        layer_outs.append(loss_in[0].hidden)
        layers[i] = layer.to("cpu")
    secs["layers"] = time.perf_counter() - t0

    # 2) Hessian traces of the calibration loss, every unit at once
    t0 = time.perf_counter()
    names = [f"{m}.weight" for u in units for m in u.members]
    with torch.enable_grad():
        est = model_traces(model, names, loss_windows, device, method=trace_method, tol=trace_tol,
                           max_probes=max_probes, seed=seed, progress=progress)
    per_name = dict(zip(names, zip(est.mean, est.se)))
    trace = [sum(per_name[f"{m}.weight"][0] for m in u.members) for u in units]
    trace_se = [math.sqrt(sum(per_name[f"{m}.weight"][1] ** 2 for m in u.members)) for u in units]
    m_trace = [[per_name[f"{m}.weight"][0] for m in u.members] for u in units]
    m_trace_se = [[per_name[f"{m}.weight"][1] for m in u.members] for u in units]
    secs["trace"] = time.perf_counter() - t0

    # 3) measured loss increases: each unit alone, and pairs within pair_window blocks, at pair_bits
    t0 = time.perf_counter()
    single, pairs = [0.0] * U, []
    model.to(device)
    ids = loss_windows.to(device)

    def loss_from(start: int, swap: dict[str, torch.Tensor]) -> float:
        return _loss_from(model, layers, layer_outs, as_tuple, ids, start, swap)

    base = loss_from(0, {})
    pc = next((c for c, cand in enumerate(candidates) if cand.bits == pair_bits), None)
    single_all: list[list[float | None]] = [[None] * C for _ in range(U)]
    todo = [((k, c),) for k in range(U) for c, cand in enumerate(candidates) if cand.bits in single_set]
    if pc is not None:
        todo += [((a, pc), (b, pc)) for a in range(U) for b in range(a + 1, U)
                 if units[b].layer - units[a].layer <= pair_window]
    for t in tqdm(todo, desc="loss deltas", disable=not progress, unit="pass"):
        if not all(kc in probe_weights for kc in t):
            continue  # the width does not apply to this unit
        swap = {m: w for kc in t for m, w in probe_weights[kc].items()}
        dl = loss_from(min(units[k].layer for k, _ in t), swap) - base
        if len(t) == 1:
            single_all[t[0][0]][t[0][1]] = dl
        else:
            pairs.append((t[0][0], t[1][0], dl))
    if pc is not None:
        single = [row[pc] or 0.0 for row in single_all]
    context = context_single = context_dloss = context_exact = None
    if anchor is not None:
        context = candidates[anchor[0]].label if context_anchor is None else "mixed"
        context_single, context_dloss, context_exact = _measure_in_context(
            model, arch, layers, units, candidates, probe_weights, anchor, loss_windows, device, as_tuple, base,
            progress, context_method, context_exact_bits)
    model.to("cpu")
    secs["loss_deltas"] = time.perf_counter() - t0
    secs["total"] = time.perf_counter() - t_all
    settings = dict(settings or {})
    settings.update({"method": config.method, "sym": config.sym, "partial_groups": config.partial_groups,
                     "damp_percent": config.damp_percent, "act_order": config.act_order, "clip": config.clip,
                     "static_groups": config.static_groups, "group_params": config.group_params,
                     "granularity": granularity,
                     "trace_method": trace_method, "trace_probes": est.probes, "trace_tol": trace_tol,
                     "pair_bits": pair_bits, "pair_window": pair_window, "single_bits": sorted(single_set),
                     "loss_tokens": int(loss_windows.numel()), "context_bits": context_bits,
                     "context_method": context_method if anchor is not None else None,
                     "sequential": sequential,
                     "context_exact_bits": list(context_exact_bits) if context_method == "taylor" else None})
    return Sensitivity(model_name, fingerprint(model, units), settings, units, candidates, cost, sqnorm, out_err,
                       hx_trace, trace, trace_se, base, single, pairs, int(overhead), secs,
                       m_trace, m_trace_se, m_sqnorm, m_out_err, single_all, context, context_single, context_dloss,
                       context_exact, list(context_anchor) if context_anchor is not None else None)


def _context_anchor(units: list[Unit], candidates: list[Candidate], context_bits: int | None,
                    labels: list[str] | None) -> list[int] | None:
    """Candidate index per unit of the model measured around: uniform at ``context_bits`` (each unit
    at that width's first, default-group candidate), or the given candidate labels."""
    if labels is None:
        if context_bits is None:
            return None
        return [next(c for c, cand in enumerate(candidates) if cand.bits == context_bits)] * len(units)
    if context_bits is not None:
        raise ConfigError("give either --context-bits (a uniform model) or an anchor allocation, not both.")
    known = {cand.label: c for c, cand in enumerate(candidates)}
    if len(labels) != len(units) or any(lab not in known for lab in labels):
        bad = [lab for lab in labels if lab not in known][:3]
        raise ConfigError(f"the anchor allocation must give one of the candidates {sorted(known)} for each of the "
                          f"{len(units)} units; it gives {len(labels)}" + (f" (unknown: {bad})" if bad else "") + ".")
    return [known[lab] for lab in labels]


def _anchor_weights(probe_weights: dict, anchor: list[int], ks) -> dict[str, torch.Tensor]:
    """The quantized member weights of units ``ks`` at their anchor candidates (none for a unit anchored
    at fp16, or where its candidate does not apply: it stays at fp)."""
    return {m: w for k in ks for m, w in probe_weights.get((k, anchor[k]), {}).items()}


@torch.no_grad()
def _measure_in_context(model, arch, layers, units, candidates, probe_weights, anchor, loss_windows, device, as_tuple,
                        fp_loss, progress, method="exact", exact_bits=(16,)):
    """Loss change of each (unit, candidate) with every other unit at its ``anchor`` candidate (a list
    of candidate indices); the layers in front of a unit are replayed from the anchor model's cached
    outputs. ``exact``: one pass per (unit, candidate). ``taylor``: passes only at the widths in
    ``exact_bits`` (each at its first, default-group candidate; a unit anchored at one of those
    widths gets a pass at the next of the quantized widths ≤ 4 instead), the rest predicted, each with
    the curvature fitted at the nearest width. Returns (changes (U, C), loss increase of the anchor
    model over fp, exactly measured (U, C) or None)."""
    U, C = len(units), len(candidates)
    fp_w = {m: model.get_submodule(m).weight.data for u in units for m in u.members}

    def weights(k, c):  # the member weights of unit k at candidate c (None: the candidate does not apply)
        return {m: fp_w[m] for m in units[k].members} if candidates[c].bits == 16 else probe_weights.get((k, c))

    ok = [weights(k, anchor[k]) is not None for k in range(U)]
    ctx = _anchor_weights(probe_weights, anchor, range(U))
    ids = loss_windows.to(device)
    out: list[list[float | None]] = [[None] * C for _ in range(U)]
    taylor = method == "taylor"
    hx: dict[str, torch.Tensor] = {}
    with _swapped(model, ctx):
        h = capture_layer_inputs(model, layers, loss_windows, device, len(loss_windows))
        outs = []
        for i, layer in enumerate(layers):
            if taylor:  # the input second moment of every linear, in the anchor model
                hs, _ = collect_hessians(layer, list(arch.linears), h, f"{arch.layers}.{i}.", None, (), arch.shared_input)
                hx.update({f"{arch.layers}.{i}.{n}": H for n, H in hs.items()})
            h = run_layer(layer, h)
            outs.append(h[0].hidden)

        base = _loss_from(model, layers, outs, as_tuple, ids, 0, {})
        first = {cand.bits: c for c, cand in reversed(list(enumerate(candidates)))}  # width -> default-group candidate
        fallback = [b for b in sorted(first, reverse=True) if b <= 4]
        todo = []
        for k in range(U):
            if not ok[k]:  # its anchor candidate does not apply: it stays at fp in the anchor model
                if not taylor:
                    todo += [(k, c) for c in range(C) if weights(k, c) is not None]
                continue
            out[k][anchor[k]] = 0.0
            if not taylor:
                todo += [(k, c) for c in range(C) if c != anchor[k] and weights(k, c) is not None]
                continue
            bits = [b for b in exact_bits if b != candidates[anchor[k]].bits]
            if len(bits) < len(exact_bits):  # anchored at an exact width: fit at the next width down instead
                bits += [b for b in fallback if b < candidates[anchor[k]].bits and b not in bits][:1]
            for b in bits:  # 16 is measured at the fp weights even where keeping 16 is not a candidate
                c = first.get(b)
                if b == 16 or (c is not None and weights(k, c) is not None):
                    todo.append((k, c))
        fp_dl = [None] * U
        for k, c in tqdm(todo, desc="in-context deltas", disable=not progress, unit="pass"):
            swap = {m: fp_w[m] for m in units[k].members} if c is None else weights(k, c)
            dl = _loss_from(model, layers, outs, as_tuple, ids, units[k].layer, swap) - base
            if c is None:
                fp_dl[k] = dl
            else:
                out[k][c] = dl
        if not taylor:
            return out, base - fp_loss, None
        exact = [row[:] for row in out]
        grads = _unit_gradients(model, units, ids)
    for k, u in enumerate(units):
        if not ok[k]:
            continue
        at = weights(k, anchor[k])

        def step(w):  # (g·Δ, tr(Δ H_x Δᵀ)) of moving unit k from the anchor to weights ``w``
            lin = quad = 0.0
            for m in u.members:
                d = w[m].float() - at[m].float()
                lin += float((grads[m] * d).sum())
                quad += float(((d @ hx[m]) * d).sum())
            return lin, quad

        fitted = {}  # bits -> curvature scale fitted to that width's exact pass
        for c in range(C):
            if exact[k][c] is not None and c != anchor[k]:
                fitted.setdefault(candidates[c].bits, _curvature(exact[k][c], *step(weights(k, c))))
        if fp_dl[k] is not None:
            fitted.setdefault(16, _curvature(fp_dl[k], *step(fp_w)))
        for c, cand in enumerate(candidates):
            if out[k][c] is not None or weights(k, c) is None:
                continue
            lin, quad = step(weights(k, c))
            ref = min(fitted, key=lambda b: (abs(b - cand.bits), -b)) if fitted else None
            out[k][c] = lin + 0.5 * (fitted[ref] if ref is not None else 0.0) * quad
    return out, base - fp_loss, exact


def _curvature(exact: float, lin: float, quad: float) -> float:
    """Scale ``s`` with ``exact = lin + ½ s · quad`` (≥ 0: curvature near a trained model is)."""
    return max(0.0, 2.0 * (exact - lin) / quad) if quad > 0 else 0.0


def _unit_gradients(model: nn.Module, units: list[Unit], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the mean NLL on ``ids`` with respect to every unit linear's weight, one window at
    a time (the windows have equal lengths, so their mean is the mean over all tokens)."""
    names = [m for u in units for m in u.members]
    params = [model.get_parameter(f"{m}.weight") for m in names]
    grads = {m: torch.zeros_like(p, dtype=torch.float32) for m, p in zip(names, params)}
    with grad_only(model, params, None), torch.enable_grad():
        for w in ids:
            for m, g in zip(names, torch.autograd.grad(window_loss(model, w[None], ids.device) / len(ids), params)):
                grads[m] += g.float()
    return grads
