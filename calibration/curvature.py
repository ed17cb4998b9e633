"""Curvature and gradients of the calibration loss, one decoder layer at a time.

Backpropagation needs every layer, but not all at once: the engine (:func:`quant.engine.visit`)
brings one layer at a time onto the device; the activations at the layer boundaries are stored, and
each layer is recomputed inside when the backward pass reaches it (as activation checkpointing
does). No graph ever spans more than one layer, so memory is one layer plus the boundary
activations, whatever the model's depth.

* **Hutchinson** (HAWQ-V2 §3.1): ``E[vᵀ H v] = Tr(H)`` for Rademacher ``v``. ``H v`` is the
  forward-mode derivative of backpropagation along ``v`` (Pearlmutter's R-operator): a forward
  sweep carries each boundary activation ``h_i`` and its tangent ``ḣ_i`` (``torch.func.jvp``), the
  head gives the gradient ``g_L`` at the last boundary and its tangent, and a backward sweep carries
  ``(g_i, ġ_i)`` down, each layer's jvp-of-vjp giving its block of ``H v`` exactly. It equals the
  whole-model double backward on the same probe (test), without its whole-model graph.
* **Fisher**: ``E‖∇ℓ_window‖²``, per-window gradients from one forward and one backward sweep.
* **Gradients** of the mean NLL (the Taylor path), from the same backward sweep.

The loss head (final norm, ``lm_head``, cross-entropy) runs over chunks of a few dozen positions,
each chunk's derivatives taken and its graph freed before the next, so the vocabulary-wide logits
of more than one chunk are never held.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from quant import dist
from quant.arch import Arch, decoder_layers
from quant.capture import LayerInput, capture_layer_inputs
from quant.engine import check_vocab, head_logits, head_on, oom_guard, visit

from .trace import TraceEstimate, hutchinson, summarise


# weights that replace the model's own (full parameter names), or a function of the layer index giving them
Overrides = "dict[str, torch.Tensor] | Callable[[int], dict[str, torch.Tensor]] | None"


def rademacher(seed: int, probe: int, block: int, shape, device, dtype) -> torch.Tensor:
    """±1 entries, a pure function of (seed, probe, block): a layer's probe is drawn again when the
    backward pass reaches it instead of being held for the whole model."""
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{probe}:{block}".encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(key & (2**63 - 1))
    return (torch.randint(0, 2, tuple(shape), generator=g) * 2 - 1).to(device, dtype)


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Eager attention for the duration: fused attention kernels have no forward-mode derivative."""
    old = getattr(model.config, "_attn_implementation", None)
    if old not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(old)


@contextlib.contextmanager
def _frozen(layer: nn.Module):
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _layer_fn(layer: nn.Module, kwargs: dict, fixed: dict[str, torch.Tensor]) -> Callable:
    """``h, θ -> layer output`` with the probed weights ``θ`` (a dict of local names) as inputs and
    ``fixed`` (weight overrides, e.g. an anchor model's quantized weights) substituted."""
    def f(h, theta):
        out = functional_call(layer, {**fixed, **theta}, (h,), kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out
    return f


def _head_grads(model: nn.Module, arch: Arch, h: torch.Tensor, ids: torch.Tensor, total: int, chunk: int,
                tangents: torch.Tensor | None = None):
    """``g = ∂ℓ/∂h`` for ``ℓ = Σ NLL / total`` over the next-token targets of ``ids`` (b, seq), from
    the last boundary ``h`` (b, seq, hidden), and with ``tangents`` (P, b, seq, hidden) also each
    probe's tangent of ``g``. The loss is a sum over positions and the head (final norm, ``lm_head``)
    works per position, so this runs ``chunk`` positions at a time, each chunk's graph freed before the
    next: the vocabulary-wide logits of only ``chunk`` positions are ever held."""
    def loss_of(x, y):  # x (n, hidden), y (n,)
        logits = head_logits(model, arch, x).float()  # (n, vocab)
        return nn.functional.cross_entropy(logits, y, reduction="sum") / total

    g = torch.zeros_like(h)
    gt = torch.zeros_like(tangents) if tangents is not None else None
    for w in range(ids.shape[0]):
        for a in range(0, ids.shape[1] - 1, chunk):
            e = min(a + chunk, ids.shape[1] - 1)
            x, y = h[w, a:e], ids[w, a + 1 : e + 1]
            if tangents is None:
                g[w, a:e] = grad(loss_of)(x, y)
            else:
                dx = grad(lambda x: loss_of(x, y))
                g[w, a:e], gt[:, w, a:e] = vmap(lambda t: jvp(dx, (x,), (t,)), out_dims=(None, 0))(tangents[:, w, a:e])
    return g, gt


class _Sweeps:
    """The pieces both passes share: per-layer probed names, boundary inputs, the head."""

    def __init__(self, model, arch, names, windows, device, per_batch, overrides):
        self.model, self.arch, self.device = model, arch, device
        self.prefix = [f"{arch.layers}.{i}." for i in range(len(decoder_layers(model, arch)))]
        self.local = [[(k, n.removeprefix(p)) for k, n in enumerate(names) if n.startswith(p)] for p in self.prefix]
        if sum(map(len, self.local)) != len(names):
            bad = [n for n in names if not any(n.startswith(p) for p in self.prefix)][:3]
            raise ValueError(f"curvature is measured for decoder-layer weights only, not {bad}.")
        self.overrides = overrides if callable(overrides) else (lambda i, o=overrides or {}: o)
        check_vocab(model, windows, "curvature")
        self.batches: list[LayerInput] = capture_layer_inputs(model, decoder_layers(model, arch), windows, device,
                                                              per_batch)
        self.ids = [windows[b : b + per_batch].to(device) for b in range(0, len(windows), per_batch)]
        self.total = int(windows.shape[0]) * (int(windows.shape[1]) - 1)

    def fn(self, i: int, layer: nn.Module, x: LayerInput):
        p = self.prefix[i]
        fixed = {n.removeprefix(p): w for n, w in self.overrides(i).items() if n.startswith(p)}
        fixed = {n: w.to(self.device, layer.get_parameter(n).dtype) for n, w in fixed.items()}
        # the point the derivatives are taken at: the override where there is one, else the layer's weight
        theta = {local: fixed.pop(local) if local in fixed else layer.get_parameter(local).detach()
                 for _, local in self.local[i]}
        return _layer_fn(layer, x.kwargs, fixed), theta

    def layers(self, order, desc, progress=False):
        return visit(self.model, self.arch, order, self.device, keep=False, progress=progress, desc=desc)


def hutchinson_traces(model: nn.Module, arch: Arch, names: list[str], windows: torch.Tensor, device: torch.device, *,
                      tol: float = 0.05, min_probes: int = 4, max_probes: int = 32, seed: int = 0,
                      probes_per_sweep: int = 4, max_batch_tokens: int = 1024, chunk_tokens: int = 32,
                      overrides: Overrides = None, progress: bool = True) -> TraceEstimate:
    """Hutchinson estimate of the trace of the loss Hessian's diagonal block of each named decoder
    weight (mean NLL on ``windows`` (n, seq)). Probes run ``probes_per_sweep`` per pair of sweeps;
    the estimate stops after the first probe at which every block's standard error is below
    ``tol`` × the mean |trace| (after ``min_probes``), exactly as if the probes ran one by one.
    With several processes each runs the next ``probes_per_sweep`` probes in turn (process ``r``
    the ``r``-th such block of a round) and all receive every probe's row, so each probe runs with
    the same companions as in one process."""
    per = max(1, max_batch_tokens // max(1, windows.shape[1]))

    def sample(probes: list[int]) -> list[list[float]]:
        mine = probes[dist.rank() * probes_per_sweep: (dist.rank() + 1) * probes_per_sweep]
        rows = _hutchinson_chunk(run, names, mine, seed, chunk_tokens) if mine else []
        return [row for part in dist.gather_all(rows) for row in part]

    with eager_attention(model), torch.enable_grad(), oom_guard("hutchinson", device, lambda: "a layer's jvp"):
        run = _Sweeps(model, arch, names, windows, device, per, overrides)
        return hutchinson(sample, tol=tol, min_probes=min_probes, max_probes=max_probes,
                          per_call=probes_per_sweep * dist.world(), progress=progress)


def _hutchinson_chunk(run: _Sweeps, names: list[str], probes: list[int], seed: int, chunk_tokens: int
                      ) -> list[list[float]]:
    """``vᵀ(Hv)`` per block for each probe in ``probes``: one forward and one backward sweep, the
    probes batched by ``vmap`` (each layer's primal computed once, its tangents as one batch)."""
    L, P = len(run.prefix), len(probes)

    def probe_of(i, theta):  # (P, *shape) per probed weight of layer i
        return {local: torch.stack([rademacher(seed, p, k, theta[local].shape, run.device, theta[local].dtype)
                                    for p in probes]) for k, local in run.local[i]}

    # forward: boundary activations and their tangents along every probe (stored on the CPU)
    hs = [x.hidden for x in run.batches]  # per batch (b, seq, hidden)
    tangents = [h.new_zeros((P, *h.shape)) for h in hs]  # per batch (P, b, seq, hidden)
    saved: list[tuple[list, list]] = []
    for i, layer in run.layers(range(L), "hutchinson forward"):
        saved.append(([h.cpu() for h in hs], [t.cpu() for t in tangents]))
        with _frozen(layer):
            for b, x in enumerate(run.batches):
                f, theta = run.fn(i, layer, x)
                h = hs[b]
                hs[b], tangents[b] = vmap(lambda t, v: jvp(f, (h, theta), (t, v)), out_dims=(None, 0))(
                    tangents[b], probe_of(i, theta))
    # the head: g_L = ∂ℓ/∂h_L and its tangent along each probe
    gs, gts = [], []
    with head_on(run.model, run.arch, run.device), _frozen(run.model.get_output_embeddings()), \
            _frozen(run.model.get_submodule(run.arch.norm)):
        for b, ids in enumerate(run.ids):
            g, gt = _head_grads(run.model, run.arch, hs[b], ids, run.total, chunk_tokens, tangents[b])
            gs.append(g)
            gts.append(gt)
    del hs, tangents
    # backward: each layer's block of H v from its jvp-of-vjp, and (g, ġ) for the layer below
    out = torch.zeros(P, len(names), dtype=torch.float64)
    for i, layer in run.layers(reversed(range(L)), "hutchinson backward"):
        h_in, t_in = saved.pop()
        with _frozen(layer):
            for b, x in enumerate(run.batches):
                f, theta = run.fn(i, layer, x)
                h, g = h_in[b].to(run.device), gs[b]

                def back(h, theta, g, f=f):
                    return vjp(f, h, theta)[1](g)

                v = probe_of(i, theta)
                (gh, _), (gth, hv) = vmap(lambda t, vv, gt: jvp(back, (h, theta, g), (t, vv, gt)),
                                          out_dims=((None, None), (0, 0)))(t_in[b].to(run.device), v, gts[b])
                for k, local in run.local[i]:
                    out[:, k] += (v[local].float() * hv[local].float()).flatten(1).sum(1).double().cpu()
                gs[b], gts[b] = gh, gth
    return out.tolist()


def layer_gradients(model: nn.Module, arch: Arch, names: list[str], windows: torch.Tensor, device: torch.device,
                    on_grad: Callable[[str, int, torch.Tensor], None], *, overrides: Overrides = None,
                    chunk_tokens: int = 64, progress: bool = True) -> None:
    """Gradient of each window's mean NLL with respect to each named decoder weight, by one forward
    and one backward sweep over the layers: ``on_grad(name, window, gradient)`` for every pair (the
    gradient is on ``device``, in the weight's dtype)."""
    with eager_attention(model), torch.enable_grad(), oom_guard("gradients", device, lambda: "a layer's backward"):
        run = _Sweeps(model, arch, names, windows, device, 1, overrides)
        L = len(run.prefix)
        hs = [x.hidden for x in run.batches]
        saved = []
        for i, layer in run.layers(range(L), "gradients forward", progress):
            saved.append([h.cpu() for h in hs])
            with _frozen(layer):
                new_h = []
                for x, h in zip(run.batches, hs):
                    f, theta = run.fn(i, layer, x)
                    new_h.append(f(h, theta))
                hs = new_h
        with head_on(model, arch, device), _frozen(model.get_output_embeddings()), _frozen(model.get_submodule(arch.norm)):
            gs = [_head_grads(model, arch, h, ids, ids.shape[1] - 1, chunk_tokens)[0] for ids, h in zip(run.ids, hs)]
        del hs
        for i, layer in run.layers(reversed(range(L)), "gradients backward", progress):
            h_in = saved.pop()
            with _frozen(layer):
                for w, x in enumerate(run.batches):
                    f, theta = run.fn(i, layer, x)
                    gh, gth = vjp(f, h_in[w].to(device), theta)[1](gs[w])
                    for k, local in run.local[i]:
                        on_grad(names[k], w, gth[local])
                    gs[w] = gh


def _shared_out(windows: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """This process's windows (``rank::world``) and whether they are split; with fewer windows than
    processes every process takes them all."""
    split = dist.world() > 1 and len(windows) >= dist.world()
    return (windows[dist.rank():: dist.world()] if split else windows), split


def fisher_traces(model: nn.Module, arch: Arch, names: list[str], windows: torch.Tensor, device: torch.device, *,
                  overrides: Overrides = None, progress: bool = True) -> TraceEstimate:
    """Empirical Fisher trace per named weight: the mean over windows of ‖∇ℓ_window‖² (one
    backward per window, no second derivative). Under torchrun each process takes every
    ``world``-th window and the per-window rows are gathered in window order."""
    index = {n: k for k, n in enumerate(names)}
    mine, split = _shared_out(windows)
    rows = torch.zeros(len(mine), len(names), dtype=torch.float64)  # (windows, names)

    def add(name, w, g):
        rows[w, index[name]] += float(g.float().pow(2).sum())

    layer_gradients(model, arch, names, mine, device, add, overrides=overrides, progress=progress)
    if split:
        parts, rows = dist.gather_all(rows), torch.zeros(len(windows), len(names), dtype=torch.float64)
        for r, part in enumerate(parts):
            rows[r:: dist.world()] = part
    return summarise(rows, len(windows))


def mean_gradients(model: nn.Module, arch: Arch, names: list[str], windows: torch.Tensor, device: torch.device, *,
                   overrides: Overrides = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Gradient of the mean NLL over ``windows`` (equal lengths) for each named weight, fp32 on the
    CPU. Under torchrun each process sums its share of the windows and the sums are all-reduced
    (the same mean, summed in another order: equal to one process's within rounding)."""
    out: dict[str, torch.Tensor] = {}
    mine, split = _shared_out(windows)

    def add(name, w, g):
        g = g.float().cpu() / len(windows)
        out[name] = g if name not in out else out[name] + g

    layer_gradients(model, arch, names, mine, device, add, overrides=overrides, progress=progress)
    if split:  # on the device: NCCL sums GPU tensors only
        out = {n: dist.all_reduce_sum(g.to(device)).cpu() for n, g in out.items()}
    return out
