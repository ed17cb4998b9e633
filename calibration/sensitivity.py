"""The sensitivity measurement's result (:class:`Sensitivity`): for every *unit* (what gets one
precision, see :mod:`calibration.units`) and every candidate (bits, group size), what quantizing it
costs and how much damage it does, its file form, and the objectives the allocation reads from it.

Recorded per unit and candidate (the real GPTQ/RTN perturbation ``ΔW = Ŵ − W`` on fp inputs):
  * ``‖ΔW‖²`` and HAWQ-V2's ``Ω = Tr(H)/n · ‖ΔW‖²`` (HAWQ-V2 eq. 3), with ``Tr(H)`` of the loss by
    Hutchinson (``calibration/curvature.py``);
  * the layer-output error ``tr(ΔW H_x ΔWᵀ)``, ``H_x = 2XXᵀ/n`` (GPTQ eq. 1, what GPTQ minimises).
Recorded per unit: the loss increase ``ΔL_i`` when it alone is quantized to ``pair_bits``; per pair
of units at most ``pair_window`` decoder blocks apart: ``ΔL_ij``; their difference
``ΔL_ij − ΔL_i − ΔL_j`` is the inter-layer dependency (*Augmenting Hessians with Inter-Layer
Dependencies for Mixed-Precision PTQ*, §3), which layer-wise Hessians miss.

The measurement itself runs in :mod:`calibration.measure`. The result is one JSON file with the
settings and a fingerprint of the model, reusable for any budget and refused for another model.
"""
from __future__ import annotations
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from quant.arch import Arch
from quant.config import ConfigError

from .units import Candidate, Unit, build_units, fingerprint

FORMAT = "hmq-sensitivity/1"
OBJECTIVES = ("hessian", "measured", "context", "output", "trace")
# ``context``: measured gains (negative changes) count at this fraction. Each unit's in-context gain
# includes the damage it does *together with* the others; widen several and that shared damage is
# counted once per unit. On SmolLM2 at 3.161 bpw: 1.0 -> 85.96, 0.725 (the share that makes the
# all-fp move exact) -> 81.47, 0.5 -> 75.26 held-out perplexity, uniform GPTQ 84.49.
CONTEXT_GAIN_SCALE = 0.5


class SensitivityError(ConfigError):
    """A measurement file is missing, corrupt, or belongs to another model."""


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
        if self.clip:  # files from before the weighted range search: unweighted
            out["clip_weighted"] = bool(self.settings.get("clip_weighted", False))
            if out["clip_weighted"]:  # files from before the two searches: the weighted one alone
                out["clip_both"] = bool(self.settings.get("clip_both", False))
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
        use_pairs = objective in ("hessian", "measured") and pairs
        P = self._pair_terms(shape) if use_pairs else {}
        return D, P

    def _pair_terms(self, shape: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
        """Each measured pair's interaction at ``pair_bits``, scaled to every (a, b) like a bilinear
        second-order cross term of the units' predicted damages ``shape`` (see :meth:`tables`)."""
        P: dict[tuple[int, int], np.ndarray] = {}
        c = self.pair_column()
        if c is None:
            return P
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
        return P

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
