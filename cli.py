"""The ``hmq`` command: parse arguments, merge a YAML preset, call the library, print a summary.

    hmq quantize [--model M] [--bits 4] [--group-size 128] [--method gptq] [--calib foldoc] --out DIR
    hmq eval     [--model M | DIR] [--data foldoc] [--max-windows N] [--json PATH]
    hmq inspect  DIR [--json]
    hmq measure  [--model M] [--calib foldoc] --out m.sens           # sensitivity, once per model
    hmq quantize --sensitivity m.sens --budget 3.0 | --budget-gb G | --max-ppl-increase 5% --out DIR
    hmq frontier --sensitivity m.sens --verify 6 --out frontier/     # JSON + PNG
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cli_args import DEFAULT_CANDIDATES, build_parser

if TYPE_CHECKING:
    from quant.config import QuantConfig

log = logging.getLogger("hmq")


def _parse_bits_list(text: str, flag: str) -> list[int]:
    from calibration.runs import parse_bits_list

    return parse_bits_list(text, flag)


def resolve_settings(args) -> tuple[dict, "QuantConfig", set[str]]:
    """Preset < flags (see :func:`quant.config.resolve_settings`)."""
    import dataclasses

    from quant.config import QuantConfig, RUN_KEYS, resolve_settings as resolve

    flags = {k: getattr(args, k, None) for k in RUN_KEYS | {f.name for f in dataclasses.fields(QuantConfig)}}
    return resolve(args.config, flags, getattr(args, "override", None))


def _measure_options(args):
    from calibration.runs import MeasureOptions

    return MeasureOptions(candidates=args.candidates, keep=not args.no_keep, units=args.units, trace=args.trace,
                          probes=args.probes, trace_tol=args.trace_tol, loss_samples=args.loss_samples,
                          loss_seqlen=args.loss_seqlen, pair_bits=args.pair_bits or None, pair_window=args.pair_window,
                          single_bits=args.single_bits, context_bits=args.context_bits or None,
                          context_method=args.context_method, context_exact_bits=args.context_exact_bits)


def _alloc_options(args):
    from calibration.runs import AllocOptions

    return AllocOptions(args.objective, not args.no_pairs, args.gain_scale)


def cmd_measure(args) -> int:
    from calibration.runs import measure_run

    t0 = time.perf_counter()
    run, config, explicit = resolve_settings(args)
    sens, path = measure_run(run, config, explicit, _measure_options(args), args.out, restart=args.restart,
                             progress=not args.no_progress)
    print_sensitivity(sens)
    print(f"measured in {time.perf_counter() - t0:.1f} s; wrote {path}")
    return 0


def print_sensitivity(sens) -> None:
    import numpy as np

    D, _ = sens.tables("hessian", pairs=False)
    c3 = sens.pair_column()
    print()
    print(f"{'unit':<40} {'Tr(H)':>10} {'±se':>8} {'pred ΔL@' + str(sens.settings.get('pair_bits')):>11} {'meas ΔL':>9}")
    order = np.argsort(-D[:, c3]) if c3 is not None else range(len(sens.units))
    for k in list(order)[:12]:
        u = sens.units[k]
        pred = f"{D[k, c3]:.4f}" if c3 is not None else "-"
        print(f"{u.name[-40:]:<40} {sens.trace[k]:>10.3g} {sens.trace_se[k]:>8.2g} {pred:>11} {sens.single[k]:>9.4f}")
    inter = [lij - sens.single[i] - sens.single[j] for i, j, lij in sens.pairs]
    print(f"{len(sens.units)} units × {len(sens.candidates)} candidates; {len(sens.pairs)} pairs measured "
          f"(mean interaction {np.mean(inter) if inter else 0:+.4f} nats); base loss {sens.base_loss:.4f}; "
          f"trace probes {sens.settings.get('trace_probes')}")


def _latency_table(args) -> dict | None:
    """The --latency-table JSON when a latency budget is given, else None."""
    from quant.config import ConfigError

    if args.budget_latency is None:
        return None
    try:
        return json.loads(Path(args.latency_table).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--latency-table {args.latency_table!r} is not a readable JSON file ({exc}).") from None


def _parse_percent(text: str) -> float:
    from quant.config import ConfigError

    t = text.strip()
    try:
        value = float(t.rstrip("%")) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise ConfigError(f"--max-ppl-increase {text!r} must look like 5% or 0.05.") from None
    if not value > 0:
        raise ConfigError(f"--max-ppl-increase {text!r} must be positive.")
    return value


def _budget_options(args):
    """The one budget the flags give (they are checked against each other here, before any work)."""
    from calibration.quantize_run import BudgetOptions
    from quant.config import ConfigError

    budgets = [x for x in (args.budget, args.budget_gb, args.max_ppl_increase, args.budget_latency) if x is not None]
    if len(budgets) > 1:
        raise ConfigError("give one of --budget, --budget-gb, --budget-latency and --max-ppl-increase, not several.")
    if (args.budget_latency is None) != (args.latency_table is None):
        raise ConfigError("--budget-latency and --latency-table go together: give both.")
    if args.search and (not budgets or args.max_ppl_increase is not None):
        raise ConfigError("--search refines the allocation of one budget: give it with --budget, --budget-gb or "
                          "--budget-latency (not alone, and not with --max-ppl-increase).")
    if args.sensitivity and not budgets:
        raise ConfigError("--sensitivity needs a budget: add --budget BPW, --budget-gb GB or --max-ppl-increase PCT.")
    limit = _parse_percent(args.max_ppl_increase) if args.max_ppl_increase is not None else None
    return BudgetOptions(args.budget, args.budget_gb, args.budget_latency, _latency_table(args), limit,
                         args.bisect_steps, args.eval_windows, args.eval_seqlen)


def cmd_quantize(args) -> int:
    from calibration.quantize_run import SearchOptions, quantize_run

    t0 = time.perf_counter()
    run, config, explicit = resolve_settings(args)
    budget = _budget_options(args)
    select = _select_options(args, run, budget)
    search = None
    if select is None and args.search:
        search = SearchOptions(args.search, args.search_samples or 4, args.search_seqlen or 512,
                               args.search_offspring or 8, args.search_screen or 1)
    res = quantize_run(run, config, explicit, out=args.out, overwrite=args.overwrite, fmt=args.fmt, engine=args.engine,
                       budget=budget, measure=_measure_options(args), alloc=_alloc_options(args),
                       sensitivity=args.sensitivity, search=search,
                       default_candidates=args.candidates == DEFAULT_CANDIDATES, restart=args.restart,
                       progress=not args.no_progress, select=select)
    print_summary(res.report, res.out, time.perf_counter() - t0, res.config)
    a = res.allocation
    if a is not None and a.get("recipe") == "select":
        print_selection(a)
    elif a is not None:
        print(f"mixed precision ({a['objective']}): {a['bpw']:.3f} bpw, predicted ΔNLL {a['predicted_dloss']:.4f}, "
              f"solver {a['status']} (gap ≤ {a['gap']:.2g}, {a['solve_seconds']:.2f} s)")
        if "search" in a:
            r = a["search"]
            print(f"  search: calibration loss {r['start_score']:.4f} (ILP) -> {r['score']:.4f} in "
                  f"{r['evaluations']['full']} full + {r['evaluations']['screen']} screening passes, {r['seconds']:.0f} s")
        for step in a.get("bisection", []):
            print(f"  bisection: budget {step['budget']:.3f} bpw -> ppl {step['ppl']:.3f}")
    return 0


def _select_options(args, run: dict, budget):
    """The default recipe's effort (preset ``selection:`` < flags), or None where the run takes the
    measurement recipe: no budget, --recipe measure, --sensitivity, a latency or perplexity budget."""
    import dataclasses

    from calibration.select import SelectOptions
    from quant.config import ConfigError

    recipe = args.recipe or ("measure" if (args.sensitivity or args.budget_latency is not None
                                           or args.max_ppl_increase is not None) else "select")
    if recipe == "measure" or not budget.mixed:
        return None
    if args.sensitivity:
        raise ConfigError("--sensitivity is read by --recipe measure; the select recipe measures nothing ahead.")
    preset = dict(run.get("selection") or {})
    names = {f.name for f in dataclasses.fields(SelectOptions)}
    unknown = sorted(set(preset) - names)
    if unknown:
        raise ConfigError(f"the preset's selection: has unknown key(s) {unknown}; allowed: {sorted(names)}.")
    flags = {"generations": args.search, "samples": args.search_samples, "seqlen": args.search_seqlen,
             "offspring": args.search_offspring, "screen": args.search_screen, "pool": args.search_pool}
    opts = SelectOptions(**{**preset, **{k: v for k, v in flags.items() if v is not None}})
    opts.check()
    return opts


def _kl(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.3e}"


def print_selection(a: dict) -> None:
    """The default recipe's choice beside every uniform scheme that fits, on the windows it was chosen on."""
    s = a["search"]
    final = s["final"]
    print(f"mixed precision (KL-scored selection): {a['bpw']:.3f} bpw; the search started from {a['start']}")
    print(f"  {'configuration':<28} {'bpw':>6} {'KL, ' + final['windows'] + ' windows':>26}")
    for r in final["scored"]:
        label = ("search's choice" if r["label"] == "search" else r["label"] if r["label"].startswith("ILP")
                 else "uniform " + r["label"])
        mark = "  <- chosen" if r["label"] == final["chosen"] else ""
        gain = f"  ({r['margin']:+.1f} se)" if r.get("margin") is not None else ""
        print(f"  {label:<28} {r['bpw']:>6.3f} {_kl(r['kl']):>26}{gain}{mark}")
    print(f"  {'chosen, as written':<28} {a['bpw']:>6.3f} {_kl(a['measured_kl']):>26}")
    if any(r.get("margin") is not None for r in final["scored"]):
        print(f"  (se: a mixed configuration's gain over the best uniform one in standard errors of the per-window "
              f"differences; it is written only above {final['margin']:g})")
    print(f"  search: {s['evaluations']['full']} full + {s['evaluations']['screen']} screening passes; time: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in a["seconds"].items()))


def solver_line(config) -> str:
    """How the weights were solved, in one line for the summary."""
    from quant.config import REACHED_UP_TO_BITS

    if config.method not in ("gptq", "affine+gptq"):
        return f"method {config.method}, range search {'on' if config.clip else 'off'}"
    order = "natural column order"
    if config.act_order:
        groups = (f"static groups ({config.group_params}" + (f": set when reached up to {REACHED_UP_TO_BITS} bits, "
                                                              "up front above)" if config.group_params == "auto" else ")")
                  if config.static_groups else "groups in solve order (g_idx)")
        order = f"columns in Hessian order, {groups}"
    return f"method {config.method}: {order}, range search {'on' if config.clip else 'off'}, damping {config.damp_percent}"


def print_summary(report, out: Path, seconds: float, config=None) -> None:
    rows: dict[int, list] = {}
    for m in report.modules:
        r = rows.setdefault(m.bits, [0, 0, 0])
        r[0] += 1
        r[1] += m.params
        r[2] += m.bytes
    print()
    print(f"{'bits':>5} {'modules':>8} {'params':>12} {'bytes':>12} {'bpw':>7}")
    for bits in sorted(rows):
        n, params, nbytes = rows[bits]
        print(f"{bits:>5} {n:>8} {params:>12,} {nbytes:>12,} {8 * nbytes / params:>7.3f}")
    params = sum(r[1] for r in rows.values())
    nbytes = sum(r[2] for r in rows.values())
    print(f"{'all':>5} {sum(r[0] for r in rows.values()):>8} {params:>12,} {nbytes:>12,} {8 * nbytes / params:>7.3f}")
    print("bpw counts packed codes + fp16 scales + packed zeros of the decoder-layer linears.")
    if config is not None:
        print(solver_line(config))
    picks = getattr(report, "range_picks", [])
    if picks:
        counts = ", ".join(f"{name} {picks.count(name)}" for name in dict.fromkeys(picks))
        print(f"range search kept per decoder layer (the nearest layer output to fp's): {counts}")
    print(f"quantized in {report.seconds:.1f} s, {seconds:.1f} s in all; wrote {out}")


# ---- frontier -----------------------------------------------------------------------------------


def cmd_frontier(args) -> int:
    from calibration.mixed import plot_frontier
    from calibration.runs import FrontierOptions, frontier_run
    from calibration.sensitivity import Sensitivity
    from quant import dist
    from quant.model_io import load_model, resolve_device, resolve_dtype

    device = resolve_device(dist.init(args.device))  # under torchrun: each process quantizes and evaluates a share
    if args.verify:  # the points it quantizes shard their calibration batches: refuse too few before any work
        dist.check_batches(args.nsamples, args.batch_size)
    sens = Sensitivity.load(args.sensitivity)
    opts = FrontierOptions(args.verify, _parse_bits_list(args.uniform_bits, "--uniform-bits"), args.map_budget,
                           args.eval_windows, args.eval_seqlen, args.nsamples, args.seqlen, args.batch_size)
    out = Path(args.out)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(args.dtype, device)
    with dist.main_first():
        model, tokenizer, arch = load_model(args.model, dtype, stream=True)
    sens.check_model(model, arch)
    payload = frontier_run(sens, model, tokenizer, lambda: load_model(args.model, dtype, stream=True), device,
                           _alloc_options(args), opts)
    heat = payload.pop("heat")
    fp, predicted, verified, uniform = (payload[k] for k in ("fp_ppl", "predicted", "verified", "uniform"))
    if dist.is_main():  # one process writes
        (out / "frontier.json").write_text(json.dumps(payload, indent=1))
        plot_frontier(out / "frontier.png", predicted, verified, uniform, fp, sens, heat,
                      f"{sens.model}: mixed ({args.objective}) vs uniform")
    print()
    print(f"{'point':<22} {'bpw':>7} {'pred ppl':>10} {'ppl':>10}")
    for p in predicted[:: max(1, len(predicted) // 8)]:
        print(f"{'frontier (predicted)':<22} {p['bpw']:>7.3f} {p['predicted_ppl']:>10.3f} {'':>10}")
    for p in verified:
        print(f"{'mixed (verified)':<22} {p['bpw']:>7.3f} {p['predicted_ppl']:>10.3f} {p['ppl']:>10.3f}")
    for p in uniform:
        print(f"{'uniform ' + p['method'] + ' w' + str(p['bits']):<22} {p['bpw']:>7.3f} {'':>10} {p['ppl']:>10.3f}")
    print(f"fp perplexity {fp:.3f}; wrote {out / 'frontier.json'} and {out / 'frontier.png'}")
    return 0


def cmd_export(args) -> int:
    from quant.convert import convert_checkpoint

    out, n = convert_checkpoint(args.path, args.out, args.fmt, args.engine, verify=not args.no_verify,
                                overwrite=args.overwrite)
    print(f"wrote {out} ({args.fmt}, checked for {args.engine}): {n} quantized linears")
    return 0


# ---- eval / inspect -----------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from calibration.runs import eval_run

    results = eval_run(args.model, args.data, args.seqlen, args.max_windows, args.baseline, args.dtype, args.device,
                       progress=not args.no_progress, kl=args.kl, reference=args.reference)
    print()
    print(f"{'model':<48} {'data':<10} {'windows':>7} {'tokens':>8} {'ppl':>9}")
    for r in results:
        print(f"{str(r['model'])[-48:]:<48} {r['data']:<10} {r['windows']:>7} {r['tokens']:>8} {r['ppl']:>9.3f}")
    if "kl" in results[0]:
        r = results[0]
        print(f"\nKL(reference || model), nats per token, against {r['reference_model']}:")
        print(f"{'mean':>9} {'median':>9} {'p90':>9} {'p99':>9} {'p99.9':>9} {'max':>9} {'top-1':>7}")
        print(f"{r['kl']:>9.5f} {r['kl_median']:>9.5f} {r['kl_p90']:>9.5f} {r['kl_p99']:>9.5f} {r['kl_p999']:>9.5f} "
              f"{r['kl_max']:>9.4f} {r['top1']:>7.4f}")
    if args.json and os.environ.get("RANK", "0") == "0":  # one process writes
        payload = {**results[0], **{r.pop("role"): r for r in results[1:]}}  # "baseline", "reference"
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from quant.inspect import inspect_checkpoint, to_json

    rep = inspect_checkpoint(args.path)
    if args.json:
        print(to_json(rep))
        return 0
    print(f"{'module':<44} {'bits':>4} {'group':>6} {'params':>10} {'bytes':>10}")
    for name, m in rep["modules"].items():
        print(f"{name:<44} {m['bits']:>4} {str(m['group_size'] or '-'):>6} {m['params']:>10,} {m['bytes']:>10,}")
    print(f"\n{len(rep['modules'])} linears, {rep['params']:,} weights, {rep['bytes']:,} bytes: "
          f"{rep['bpw']:.3f} bits per weight (scales and zeros included); files {rep['file_bytes']:,} bytes")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from quant import dist

    main_rank = os.environ.get("RANK", "0") == "0"
    if dist.launched() and args.command in ("inspect", "export") and not main_rank:
        return 0  # they read and write files, with nothing to share out: the first process alone runs them
    if dist.launched() and not main_rank:  # one process reports
        args.no_progress, args.verbose = True, False
        sys.stdout = open(os.devnull, "w")
    if not log.handlers:  # our messages only; other libraries keep their own logging
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hmq: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if dist.launched() and not main_rank else logging.INFO)
    from calibration.data import DataError
    from quant.hessian import CalibrationError
    from quant.config import ConfigError
    from quant.allocate import BudgetError
    from quant.engine import OutOfMemory, TokenizerMismatch
    from quant.evaluate import EvalError
    from quant.export import CheckpointError
    from quant.model_io import ModelLoadError

    try:
        commands = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "measure": cmd_measure,
                    "frontier": cmd_frontier, "export": cmd_export}
        code = commands[args.command](args)
        dist.finish()
        return code
    except (ConfigError, DataError, CalibrationError, CheckpointError, ModelLoadError, BudgetError, EvalError,
            OutOfMemory, TokenizerMismatch) as exc:
        print(f"hmq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
