"""What GPTQ's own objective says of the two range searches: every linear of a model solved with the
weighted range search alone, the unweighted one alone, and both row by row (the default,
``clip_both``), each scored by its layer output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``, on the ``H`` it
was solved with (calibration windows of seed 0) and on ``H`` from other windows (seed 1).

    python bench/range_rows.py --scheme w3g64 --json bench/results/range_rows_smollm2_w3g64.json
    python bench/range_rows.py --model <Gemma folder> --scheme w3g64 --json bench/results/range_rows_gemma_w3g64.json

Each layer's inputs are the fp model's (no layer in front is quantized): this isolates the solves.
Prints the sums over all linears and the modules where the two searches differ by more than 15%.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

import common
from quant.config import QuantConfig
from quant.hessian import HessianAccumulator
from quant.methods import get_method
from quant.model_io import load_model
from quant.quantizer import best_rows, row_errors


@torch.no_grad()
def hessians(model, layers, windows: torch.Tensor, batch: int = 4) -> dict[str, torch.Tensor]:
    """``H = 2 X Xᵀ / tokens`` of every linear's inputs in ``layers`` on ``windows`` (fp model)."""
    acc: dict[str, HessianAccumulator] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                acc[f"{i}.{name}"] = HessianAccumulator(f"{i}.{name}")
                hooks.append(m.register_forward_hook(lambda mod, inp, out, a=acc[f"{i}.{name}"]: a.add(inp[0])))
    for b in range(0, len(windows), batch):
        model(windows[b : b + batch])
    for h in hooks:
        h.remove()
    return {k: a.hessian() for k, a in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, arch = load_model(args.model)
    layers = model.get_submodule(arch.layers)
    spec = common.parse_scheme(args.scheme)
    solve_h = hessians(model, layers, common.calib(tok, args.nsamples, args.seqlen, 0))
    other_h = hessians(model, layers, common.calib(tok, args.nsamples, args.seqlen, 1))
    gptq = get_method("gptq")
    base = dict(bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
    weighted, unweighted = QuantConfig(**base, clip_both=False), QuantConfig(**base, clip_weighted=False)
    rows, totals = [], defaultdict(float)
    for key, H in solve_h.items():
        i, name = key.split(".", 1)
        W = layers[int(i)].get_submodule(name).weight.detach().float()
        qw, qu = gptq.fn(W, H, spec, weighted, key), gptq.fn(W, H, spec, unweighted, key)
        both, pick = best_rows([qw, qu], W, H)
        row = {"module": key, "unweighted_rows": float(pick.float().mean())}
        for where, h in (("solve", H), ("other", other_h[key])):
            energy = float(((W @ h) * W).sum())
            for label, q in (("weighted", qw), ("unweighted", qu), ("both", both)):
                row[f"{where}_{label}"] = float(row_errors(q, W, h).sum()) / energy
                totals[f"{where}_{label}"] += row[f"{where}_{label}"]
        rows.append(row)
    print(f"{args.model or 'SmolLM2-135M-Instruct'}, {args.scheme}: layer output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), "
          f"summed over {len(rows)} linears")
    print("| H of | weighted alone | unweighted alone | both, row by row |\n|---|---|---|---|")
    for where, label in (("solve", "the solve's windows"), ("other", "other windows")):
        print(f"| {label} | {totals[where + '_weighted']:.4f} | {totals[where + '_unweighted']:.4f} | "
              f"{totals[where + '_both']:.4f} |")
    print("\nmodules where the two searches differ by more than 15% (other windows' H):")
    print("| module | weighted | unweighted | both | rows from unweighted |\n|---|---|---|---|---|")
    for r in rows:
        w, u = r["other_weighted"], r["other_unweighted"]
        if abs(w - u) > 0.15 * min(w, u):
            print(f"| {r['module']} | {w:.5f} | {u:.5f} | {r['other_both']:.5f} | {r['unweighted_rows']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "scheme": args.scheme, "machine": common.machine(),
                       "totals": totals, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
