"""The ILP's allocation vs the same allocation refined by `hmq quantize --search`, at equal real bits
per weight, on the offline default model; held-out perplexity of the model quantize builds from each.

    python bench/search.py --sens bench/results/smollm2-g128-taylor.sens --budgets 3.0 --generations 60

Uniform GPTQ rows for comparison come from ``--uniform-json`` (a ``bench/mixed_precision.py``
result on the same held-out windows). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from calibration.data import calibration_windows, eval_tokens
from calibration.sensitivity import Sensitivity
from quant.config import QuantConfig
from quant.evaluate import perplexity
from calibration.mixed import allocate, base_config, config_for, make_problem, quantize_and_eval, search_allocation, total_params
from quant.model_io import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sens", required=True, help="sensitivity file (hmq measure)")
    ap.add_argument("--objective", default="context")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0])
    ap.add_argument("--generations", type=int, default=60)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--search-samples", type=int, default=4)
    ap.add_argument("--search-seqlen", type=int, default=512)
    ap.add_argument("--screen", type=int, default=1, help="windows each child is screened on")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="held-out evaluation windows of --eval-seqlen tokens")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--uniform-json", default="bench/results/mixed_context.json")
    ap.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                    help="quantize with (or without) range search; default: as the sensitivity was measured")
    ap.add_argument("--json", default="bench/results/search.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    load = lambda: load_model(args.model, dtype)  # noqa: E731
    model, tok, arch = load()
    sens = Sensitivity.load(args.sens)
    sens.check_model(model, arch)
    solver = sens.solver if args.clip is None else {**sens.solver, "clip": args.clip}
    base = base_config(sens, QuantConfig(method="gptq", group_size=sens.settings.get("group_size", 128), **solver))
    windows = calibration_windows(tok, "foldoc", args.nsamples, args.seqlen, 0)
    loss_windows = calibration_windows(tok, "foldoc", args.search_samples, args.search_seqlen, 1)
    _, ids = eval_tokens(tok, "foldoc")
    fp = perplexity(model, ids, args.eval_seqlen, args.windows, device, progress=False)["ppl"]
    print(f"fp perplexity {fp:.3f} on {args.windows} × {args.eval_seqlen} held-out tokens", flush=True)
    uniform = []
    if args.uniform_json and Path(args.uniform_json).is_file():
        u = json.loads(Path(args.uniform_json).read_text())
        if math.isclose(u["fp_ppl"], fp, rel_tol=1e-6):  # the same held-out windows
            uniform = [r for r in u["uniform"] if r.get("method") == "gptq"]
        else:
            print(f"not comparing with {args.uniform_json}: its fp perplexity {u['fp_ppl']:.3f} says other windows")
    n = total_params(sens)
    problem = make_problem(sens, args.objective)
    rows = []
    for budget in args.budgets:
        alloc = allocate(sens, budget * n / 8, args.objective, problem=problem)
        t0 = time.perf_counter()
        searched, record = search_allocation(sens, alloc, model, arch, windows, loss_windows, base, device,
                                             args.generations, args.offspring, screen=args.screen, problem=problem)
        search_s = time.perf_counter() - t0
        for label, a in (("ILP", alloc), ("ILP + search", searched)):
            ppl, report, *_ = quantize_and_eval(load, windows, config_for(sens, a, base), device, ids,
                                                args.eval_seqlen, args.windows)
            rows.append({"config": f"mixed {args.objective}, {label}", "budget": budget, "bpw": report.bpw, "ppl": ppl,
                         "measured_dloss": math.log(ppl / fp), "predicted_dloss": a.predicted_dloss,
                         "histogram": {lab: a.candidates.count(lab) for lab in sorted(set(a.candidates))},
                         "units": dict(zip(a.unit_names, a.candidates))})
            if label != "ILP":
                rows[-1]["search"] = record | {"total_seconds": search_s}
            print({k: v for k, v in rows[-1].items() if k not in ("units", "search")}, flush=True)

    print()
    print(f"{'config':<30} {'budget':>6} {'bpw':>6} {'ppl':>9} {'calib loss':>11}")
    for r in uniform:
        print(f"{r['config']:<30} {'':>6} {r['bpw']:>6.3f} {r['ppl']:>9.2f}")
    for r in rows:
        s = r.get("search")
        loss = f"{s['start_score']:.4f}->{s['score']:.4f}" if s else ""
        print(f"{r['config']:<30} {r['budget']:>6.3f} {r['bpw']:>6.3f} {r['ppl']:>9.2f} {loss:>11}")
    closed = {}
    for r in (r for r in rows if r["budget"] == 3.0):
        for g in (g for g in uniform if g["bits"] == 3):
            share = (g["ppl"] - r["ppl"]) / (g["ppl"] - fp)
            closed.setdefault(r["config"], {})[g["config"]] = share
            print(f"at 3.0 bpw, {r['config']} (ppl {r['ppl']:.2f}) closes {100 * share:.0f}% of {g['config']}'s gap to fp "
                  f"({g['bpw']:.3f} bpw, ppl {g['ppl']:.2f})")
    payload = {"machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads" if device.type == "cpu"
               else torch.cuda.get_device_name(), "settings": vars(args), "fp_ppl": fp, "uniform_gptq": uniform,
               "mixed": rows, "closed_gap_at_3bpw": closed}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
