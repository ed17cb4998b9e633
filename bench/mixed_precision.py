"""Mixed precision vs uniform GPTQ at equal real bits per weight, on the offline default model.

    python bench/mixed_precision.py --sens bench/results/smollm2.sens      # reuse a measurement
    python bench/mixed_precision.py                                         # measure first (slow on CPU)

For each budget (2.5, 3.0, 3.5, 4.25 bpw, scales and zeros included) and each objective —
(a) ``trace``: HAWQ-V2 Ω, (b) ``output``: additive output error (as exl2), (c) ``hessian``:
output error scaled by the Hessian trace plus measured inter-layer terms — allocate bits with the
ILP, quantize with GPTQ at those widths, and measure held-out perplexity. Uniform GPTQ and RTN at
2/3/4 bits (``--uniform-bits``; ``3g-1`` for a width at its own group size) are measured in the same
run, and every uniform GPTQ model's exact size gets a mixed allocation too (``--equal-objectives``).
Also: predicted vs measured ΔNLL, measurement and solve times, and the solve time of a synthetic
224-unit × 5-candidate problem with pair terms. Prints a table, writes JSON, and draws the frontier PNG.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from calibration.data import calibration_windows, eval_tokens
from calibration.sensitivity import Sensitivity
from calibration.units import parse_candidates
from calibration.measure import measure_sensitivity
from quant.allocate import Problem, solve
from quant.config import QuantConfig
from quant.evaluate import perplexity
from calibration.mixed import (allocate, config_for, frontier_allocations, min_max_bpw, plot_frontier, predicted_ppl,
                         quantize_and_eval, total_params)
from quant.model_io import load_model


def synthetic_solve_seconds(units: int = 224, cands: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    D = np.sort(rng.random((units, cands)), axis=1)[:, ::-1].copy()
    D[:, -1] = 0.0
    cost = np.tile([2.15, 3.15, 4.15, 8.15, 16.0], (units, 1)) * rng.integers(1, 4, (units, 1))
    out = {}
    for label, pairs in (("additive", {}),
                         ("with pairs", {(i, i + 1): rng.normal(scale=0.05, size=(cands, cands)) for i in range(units - 1)})):
        for solver in ("highs", "cbc"):
            sol = solve(Problem(D, cost, pairs), 3.0 / 16 * cost[:, -1].sum(), solver=solver)
            out[f"{label}, {solver}"] = {"seconds": sol.seconds, "status": sol.status, "gap": sol.gap,
                                         "objective": sol.objective, "pairs": len(pairs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sens", default=None, help="sensitivity file to reuse (else measured here and saved beside --json)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.25])
    ap.add_argument("--objectives", nargs="+", default=["trace", "output", "hessian"])
    ap.add_argument("--uniform-bits", nargs="+", default=["2", "3", "4"],
                    help="uniform baselines: widths at --group-size (3) or with their own group size (3g-1, 2g32)")
    ap.add_argument("--uniform-methods", nargs="+", default=["rtn", "gptq"], help="methods of the uniform baselines")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--candidates", default="2,3,4,8", help="when measuring here: as `hmq measure --candidates`")
    ap.add_argument("--frontier-points", type=int, default=21)
    ap.add_argument("--affine-epochs", type=int, default=5,
                    help="also reconstruct the equal-size allocations with affine+gptq (0: do not)")
    ap.add_argument("--affine-bits", type=int, nargs="*", default=[3], help="... at these uniform widths' sizes")
    ap.add_argument("--equal-objectives", nargs="*", default=["hessian"],
                    help="also allocate at each uniform GPTQ width's real bpw with these objectives")
    ap.add_argument("--single-bits", type=int, nargs="+", default=[2, 3, 4],
                    help="when measuring here: widths whose single-unit loss increases are measured")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="held-out evaluation windows of --eval-seqlen tokens")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--json", default="bench/results/mixed_precision.json")
    ap.add_argument("--png", default="bench/results/mixed_precision.png")
    ap.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                    help="range search (hmq --clip) in every quantization, uniform and mixed (default: as the --sens "
                         "measurement was taken; hmq's default, on, when measuring here)")
    ap.add_argument("--plot-objective", default="hessian", help="objective whose frontier and points the PNG shows")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    load = lambda: load_model(args.model, dtype)  # noqa: E731
    model, tok, arch = load()
    base = QuantConfig(method="gptq", group_size=args.group_size, partial_groups=True,
                       **({} if args.clip is None else {"clip": args.clip}))
    windows = calibration_windows(tok, "foldoc", args.nsamples, args.seqlen, 0)
    _, ids = eval_tokens(tok, "foldoc")
    if args.sens and Path(args.sens).is_file():
        sens = Sensitivity.load(args.sens)
        sens.check_model(model, arch)
        measured = dict(sens.solver) if args.clip is None else {**sens.solver, "clip": args.clip}
        base = dataclasses.replace(base, **measured)
    else:
        loss_windows = calibration_windows(tok, "foldoc", 2, 256, 1)
        sens = measure_sensitivity(model, arch, windows, loss_windows, parse_candidates(args.candidates.split(","), args.group_size),
                                   base, device, model_name=args.model or "SmolLM2-135M-Instruct",
                                   single_bits=tuple(args.single_bits))
        sens.save(args.sens or Path(args.json).with_suffix(".sens"))
    fp = perplexity(model, ids, args.eval_seqlen, args.windows, device, progress=False)["ppl"]
    del model
    n = total_params(sens)
    rows = [{"config": "fp16", "bpw": 16.0, "ppl": fp}]
    print(f"fp perplexity {fp:.3f} on {args.windows} × {args.eval_seqlen} held-out tokens", flush=True)

    partial = Path(args.json).with_suffix(".partial.json")  # rows so far, in case a long run is stopped

    def checkpoint(mixed_rows):
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"fp_ppl": fp, "uniform": rows, "mixed": mixed_rows,
                                       "measurement_seconds": sens.seconds, "settings": vars(args)}, indent=1))

    uniform_specs = [parse_candidates([u], args.group_size, keep=False)[0] for u in args.uniform_bits]
    for method in args.uniform_methods:
        for cand in uniform_specs:
            bits, gs = cand.bits, cand.group_size
            t0 = time.perf_counter()
            ppl, report, *_ = quantize_and_eval(load, windows, QuantConfig(**{**base.to_dict(), "method": method, "bits": bits,
                                                                           "group_size": gs}),
                                                device, ids, args.eval_seqlen, args.windows)
            name = f"uniform {method} w{bits}" + ("" if gs == args.group_size else f"g{gs}")
            rows.append({"config": name, "method": method, "bits": bits, "group_size": gs, "bpw": report.bpw,
                         "ppl": ppl, "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            checkpoint([])

    mixed = []
    # the budgets asked for, every objective; then each uniform GPTQ width's own real bpw (so the
    # comparison is at exactly equal size) for --equal-objectives
    runs = [(b, o, "budget") for b in args.budgets for o in args.objectives]
    gptq_rows = [r for r in rows if r.get("method") == "gptq"]
    runs += [(r["bpw"], o, f"= {r['config']}") for r in gptq_rows if r["bits"] != 2
             for o in args.equal_objectives]
    runs += [(r["bpw"], o, f"= {r['config']}, affine+gptq") for r in gptq_rows
             if r["bits"] in args.affine_bits and args.affine_epochs for o in args.equal_objectives]
    for budget, objective, kind in runs:
        alloc = allocate(sens, budget * n / 8, objective)
        t0 = time.perf_counter()
        cfg = config_for(sens, alloc, base)
        if kind.endswith("affine+gptq"):  # the same allocation, reconstructed with learned affine transforms
            cfg = QuantConfig(**{**cfg.to_dict(), "method": "affine+gptq", "affine_epochs": args.affine_epochs})
        ppl, report, *_ = quantize_and_eval(load, windows, cfg, device, ids, args.eval_seqlen, args.windows)
        counts = {lab: alloc.candidates.count(lab) for lab in sorted(set(alloc.candidates))}
        mixed.append({"config": f"mixed {objective}" + (" + affine" if kind.endswith("affine+gptq") else ""),
                      "objective": objective, "budget": budget, "kind": kind,
                      "bpw": report.bpw,
                      "ppl": ppl, "predicted_dloss": alloc.predicted_dloss, "measured_dloss": float(np.log(ppl / fp)),
                      "solve_seconds": alloc.solution.seconds, "status": alloc.solution.status,
                      "gap": alloc.solution.gap, "candidates_histogram": counts, "seconds": time.perf_counter() - t0,
                      "units": dict(zip(alloc.unit_names, alloc.candidates))})
        print({k: v for k, v in mixed[-1].items() if k != "units"}, flush=True)
        checkpoint(mixed)

    # how well each objective predicts the measured loss increase of single units at pair_bits
    c = sens.pair_column()
    measured_single = np.asarray(sens.single)
    agreement = {}
    for objective in (args.objectives if c is not None else []):  # a context-only measurement has no singles
        D, _ = sens.tables(objective, pairs=False)
        pred = D[:, c]
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        agreement[objective] = {"pearson": float(np.corrcoef(pred, measured_single)[0, 1]),
                                "spearman": float(np.corrcoef(rank(pred), rank(measured_single))[0, 1]),
                                "predicted_sum": float(pred.sum()), "measured_sum": float(measured_single.sum())}
    inter = [lij - sens.single[i] - sens.single[j] for i, j, lij in sens.pairs]

    solve_times = synthetic_solve_seconds()
    lo, hi = min_max_bpw(sens)
    front = frontier_allocations(sens, np.linspace(lo, min(hi, 8.5), args.frontier_points), args.plot_objective)
    predicted = [{"bpw": a.bpw, "predicted_dloss": a.predicted_dloss, "predicted_ppl": predicted_ppl(fp, a.predicted_dloss)}
                 for a in front]
    uniform = [{"method": r["method"], "bits": r["bits"], "group_size": r["group_size"], "bpw": r["bpw"], "ppl": r["ppl"]}
               for r in rows if "method" in r]
    verified = [{"bpw": m["bpw"], "ppl": m["ppl"]} for m in mixed if m["objective"] == args.plot_objective]
    heat = allocate(sens, 3.5 * n / 8, args.plot_objective)
    plot_frontier(args.png, predicted, verified, uniform, fp, sens, heat,
                  f"{sens.model}, FOLDOC held-out, g{args.group_size}")

    # table
    print()
    print(f"{'config':<24} {'budget':>6} {'bpw':>6} {'ppl':>10} {'pred ΔNLL':>10} {'meas ΔNLL':>10} {'solve s':>8}")
    for r in rows:
        print(f"{r['config']:<24} {'':>6} {r['bpw']:>6.3f} {r['ppl']:>10.3f}")
    for m in mixed:
        print(f"{m['config']:<24} {m['budget']:>6.3f} {m['bpw']:>6.3f} {m['ppl']:>10.3f} {m['predicted_dloss']:>10.4f} "
              f"{m['measured_dloss']:>10.4f} {m['solve_seconds']:>8.2f}  {m['kind']}")
    # the target: at 3.0 bpw, close half of uniform GPTQ's gap to fp. Uniform GPTQ has no model of
    # exactly 3.0 bpw; compare with each 3-bit uniform GPTQ row (the nearest at or above 3.0 is the equal-size one)
    closed = {}
    for m in (m for m in mixed if m["kind"] != "budget"):
        u = next(r for r in rows if r["config"] == m["kind"].removeprefix("= ").split(",")[0])
        print(f"at {u['bpw']:.3f} bpw (= {u['config']}, ppl {u['ppl']:.2f}), {m['config']} ppl {m['ppl']:.2f}")
    for m3 in (m for m in mixed if m["budget"] == 3.0 and m["kind"] == "budget"):
        for g3 in (r for r in rows if r.get("method") == "gptq" and r["bits"] == 3):
            closed.setdefault(m3["objective"], {})[g3["config"]] = share = (g3["ppl"] - m3["ppl"]) / (g3["ppl"] - fp)
            print(f"at 3.0 bpw, mixed ({m3['objective']}, ppl {m3['ppl']:.2f}) closes {100 * share:.0f}% of {g3['config']}'s "
                  f"gap to fp ({g3['config']}: {g3['bpw']:.3f} bpw, ppl {g3['ppl']:.2f})")
    print(f"measurement: {sens.seconds}; ILP 224 units × 5 candidates: {solve_times}")
    print(f"single-unit ΔNLL at {sens.settings.get('pair_bits')} bits, predicted vs measured: {agreement}")
    if inter:
        print(f"{len(inter)} pairs: mean interaction {np.mean(inter):+.5f}, mean |interaction| {np.mean(np.abs(inter)):.5f} "
              f"nats (mean single {measured_single.mean():.5f})")
    payload = {"machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads" if device.type == "cpu"
               else torch.cuda.get_device_name(), "settings": vars(args), "fp_ppl": fp, "uniform": rows, "mixed": mixed,
               "closed_gap_at_3bpw": closed, "measurement_seconds": sens.seconds, "measurement_settings": sens.settings,
               "synthetic_solve": solve_times, "frontier": predicted, "single_unit_agreement": agreement,
               "interactions": {"pairs": len(inter), "mean": float(np.mean(inter)) if inter else None,
                                "mean_abs": float(np.mean(np.abs(inter))) if inter else None}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))
    partial.unlink(missing_ok=True)
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
