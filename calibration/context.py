"""In-context loss changes (``--objective context``): with every unit at its candidate in an *anchor*
model (uniform at ``--context-bits``, or an allocation), the loss change when one unit alone takes
each other candidate. ``exact``: one pass per (unit, candidate) on the engine
(:func:`quant.variants.variant_nlls`). ``taylor``: passes only at a few widths, the rest predicted
from the gradient at the anchor model plus a per-unit curvature fitted to those passes."""
from __future__ import annotations

import functools

import torch
from tqdm.auto import tqdm

from quant.capture import LayerInput, collect_hessians
from quant.engine import visit
from quant.stream import stored_weight
from quant.variants import Reference, WeightCache, swapped, variant_nlls

from .curvature import mean_gradients
from .measure import anchor_swap
from .units import Candidate, Unit, units_by_layer


def _taylor_todo(k, anchor, candidates, exact_bits, weights_of) -> list:
    """The (unit, candidate) passes the Taylor method runs for unit ``k``: each width in
    ``exact_bits`` at its first, default-group candidate (``None``: fp weights where keeping 16 is not a
    candidate); a unit anchored at one of those widths gets a pass at the next quantized width ≤ 4."""
    first = {cand.bits: c for c, cand in reversed(list(enumerate(candidates)))}  # width -> default-group candidate
    fallback = [b for b in sorted(first, reverse=True) if b <= 4]
    bits = [b for b in exact_bits if b != candidates[anchor[k]].bits]
    if len(bits) < len(exact_bits):  # anchored at an exact width: fit at the next width down instead
        bits += [b for b in fallback if b < candidates[anchor[k]].bits and b not in bits][:1]
    out = []
    for b in bits:  # 16 is measured at the fp weights even where keeping 16 is not a candidate
        c = first.get(b)
        if b == 16 or (c is not None and weights_of(k, c) is not None):
            out.append((k, c))
    return out


@torch.no_grad()
def measure_in_context(model, arch, units: list[Unit], candidates: list[Candidate], weights: WeightCache,
                       anchor: list[int], loss_windows, device, fp_loss: float, progress: bool,
                       method: str = "exact", exact_bits=(16,), memo: dict | None = None):
    """Returns (changes (U, C), loss increase of the anchor model over fp, exactly measured (U, C) or
    None): see the module docstring. ``memo``: ``variant_nlls``'s ``known`` and ``on_batch``."""
    U, C = len(units), len(candidates)
    by_layer = units_by_layer(units)

    def fp_of(k):
        return {m: stored_weight(model, m) for m in units[k].members}

    def weights_of(k, c):  # unit k's member weights at candidate c (None: the candidate does not apply)
        return fp_of(k) if candidates[c].bits == 16 else weights.get((k, c))

    ok = [candidates[anchor[k]].bits == 16 or (k, anchor[k]) in weights for k in range(U)]

    @functools.lru_cache(maxsize=2)  # variants run layer by layer: the anchor's weights of the current layer
    def ctx(i):
        return anchor_swap(weights, anchor, by_layer.get(i, []))

    taylor = method == "taylor"
    ref = Reference(model, arch, loss_windows, device)
    hx: dict[str, torch.Tensor] = {}
    for i, layer in visit(model, arch, range(ref.layers), device, keep=False, progress=False):
        if taylor:  # the input second moment of every linear, in the anchor model
            prefix = f"{arch.layers}.{i}."
            here = arch.at(layer)
            with swapped(layer, prefix, ctx(i)):
                hs, _ = collect_hessians(layer, list(here.linears), [LayerInput(ref.inputs[i].to(device), ref.kwargs)],
                                         prefix, None, (), here.shared_input)
            hx.update({prefix + n: H.cpu() for n, H in hs.items()})
        ref.extend(i, layer, ctx(i))
    base = ref.nll()

    out: list[list[float | None]] = [[None] * C for _ in range(U)]
    todo = []
    for k in range(U):
        if not ok[k]:  # its anchor candidate does not apply: it stays at fp in the anchor model
            if not taylor:
                todo += [(k, c) for c in range(C) if candidates[c].bits == 16 or (k, c) in weights]
            continue
        out[k][anchor[k]] = 0.0
        if taylor:
            todo += _taylor_todo(k, anchor, candidates, exact_bits, weights_of)
        else:
            todo += [(k, c) for c in range(C) if c != anchor[k] and (candidates[c].bits == 16 or (k, c) in weights)]

    def swap_of(k, c):
        def at(i):
            if i != units[k].layer:
                return ctx(i)
            return {**ctx(i), **(fp_of(k) if c is None else weights_of(k, c))}
        return at

    nll = variant_nlls(ref, [(units[k].layer, swap_of(k, c)) for k, c in todo], progress=progress,
                       desc="in-context deltas", **(memo or {}))
    fp_dl: list[float | None] = [None] * U
    for (k, c), v in zip(todo, nll):
        if c is None:
            fp_dl[k] = v - base
        else:
            out[k][c] = v - base
    if not taylor:
        return out, base - fp_loss, None
    exact = [row[:] for row in out]
    names = [f"{m}.weight" for u in units for m in u.members]
    grads = mean_gradients(model, arch, names, loss_windows, device,
                           overrides=lambda i: {f"{m}.weight": w for m, w in ctx(i).items()})
    _predict(units, candidates, anchor, ok, out, exact, fp_dl, grads, hx, fp_of, weights_of, progress)
    return out, base - fp_loss, exact


def _predict(units, candidates, anchor, ok, out, exact, fp_dl, grads, hx, fp_of, weights_of, progress) -> None:
    """Fill the candidates ``out`` has no pass for with ``g·Δ + ½ s tr(Δ H_x Δᵀ)``, ``s`` the curvature
    fitted at the nearest width that has one."""
    for k, u in enumerate(tqdm(units, desc="taylor", disable=not progress, unit="unit")):
        if not ok[k]:
            continue
        at = weights_of(k, anchor[k])

        def step(w):  # (g·Δ, tr(Δ H_x Δᵀ)) of moving unit k from the anchor to weights ``w``
            lin = quad = 0.0
            for m in u.members:
                d = w[m].float() - at[m].float()
                lin += float((grads[f"{m}.weight"] * d).sum())
                quad += float(((d @ hx[m]) * d).sum())
            return lin, quad

        fitted = {}  # bits -> curvature scale fitted to that width's exact pass
        for c in range(len(candidates)):
            if exact[k][c] is not None and c != anchor[k]:
                fitted.setdefault(candidates[c].bits, curvature(exact[k][c], *step(weights_of(k, c))))
        if fp_dl[k] is not None:
            fitted.setdefault(16, curvature(fp_dl[k], *step(fp_of(k))))
        for c, cand in enumerate(candidates):
            w = weights_of(k, c) if out[k][c] is None else None
            if w is None:
                continue
            lin, quad = step(w)
            ref = min(fitted, key=lambda b: (abs(b - cand.bits), -b)) if fitted else None
            out[k][c] = lin + 0.5 * (fitted[ref] if ref is not None else 0.0) * quad


def curvature(exact: float, lin: float, quad: float) -> float:
    """Scale ``s`` with ``exact = lin + ½ s · quad`` (≥ 0: curvature near a trained model is)."""
    return max(0.0, 2.0 * (exact - lin) / quad) if quad > 0 else 0.0
