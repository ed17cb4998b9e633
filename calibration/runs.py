"""Whole mixed-precision runs, as the commands run them: measure a loaded model from its settings,
find the smallest budget within a perplexity limit (bisection), and compute the frontier report.
Plain options in, typed results out; the CLI (``cli.py``) only parses flags into these and prints.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quant.config import ConfigError, QuantConfig, check_bits

from .sensitivity import CONTEXT_GAIN_SCALE, Sensitivity

log = logging.getLogger("hmq")


def solved_once(solve):
    """``solve()`` run on the first process and its result given to every process: under a time
    limit two solves of one integer program need not agree."""
    from quant import dist

    return dist.gather_all(solve() if dist.is_main() else None)[0]


def parse_bits_list(text: str, what: str) -> list[int]:
    """``"2,3,4"`` -> [2, 3, 4], each a supported width (``what`` names the setting in errors)."""
    try:
        values = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} must be a comma-separated list of bit widths, e.g. 2,3,4,8.") from None
    return [check_bits(b, what) for b in values]


@dataclass
class MeasureOptions:
    """What `hmq measure` measures (its flags, in snake_case)."""

    candidates: str = "2,3,4,8"
    keep: bool = True
    units: str = "fused"
    trace: str = "hutchinson"
    probes: int = 16
    trace_tol: float = 0.05
    loss_samples: int = 4
    loss_seqlen: int = 256
    pair_bits: int | None = 3
    pair_window: int = 1
    single_bits: str = "all"
    context_bits: int | None = None
    context_method: str = "exact"
    context_exact_bits: str = "16"

    def check(self) -> None:
        for k in ("loss_samples", "loss_seqlen", "probes"):
            if getattr(self, k) < 1:
                raise ConfigError(f"--{k.replace('_', '-')} must be a positive integer.")
        if self.trace == "hutchinson" and self.probes < 2:
            raise ConfigError("--probes must be at least 2: a Hutchinson trace needs two probes for its standard error, "
                              "which the allocation uses (or pass --trace fisher).")

    def single_widths(self) -> tuple[int, ...] | None:
        text = str(self.single_bits).strip()
        return None if text == "all" else tuple(parse_bits_list(text, "--single-bits"))


def measure_request(run: dict, config: QuantConfig, opts: MeasureOptions, shared: bool = False) -> dict:
    """What a measurement was asked for (kept in its settings): a run started again reuses a
    measurement only when this is equal."""
    import dataclasses
    import json

    request = {"run": {k: run[k] for k in ("model", "calib", "nsamples", "seqlen", "seed", "batch_size", "dtype")},
               "config": config.to_dict(), "options": dataclasses.asdict(opts), "shared": shared}
    return json.loads(json.dumps(request))  # as it reads back from the file


def measure_state(folder: str | Path, run: dict, config: QuantConfig, opts: MeasureOptions, shared: bool, model,
                  arch, device, restart: bool):
    """The resume state of a measurement (:class:`quant.resume.LayerState` in ``folder``), belonging
    to what it was asked for, the model's weights and the kind of device it runs on."""
    from quant.resume import LayerState

    from .units import build_units, fingerprint

    identity = {"request": measure_request(run, config, opts, shared),
                "model": fingerprint(model, build_units(model, arch, "linear")), "device": torch.device(device).type}
    return LayerState(folder, identity, restart, "measurement")


def measure_model(model, tokenizer, arch, config: QuantConfig, run: dict, opts: MeasureOptions, device,
                  model_label: str, shared: bool = False, progress: bool = True, state=None) -> Sensitivity:
    """The measurement of a loaded model on the calibration source of ``run`` (``shared``: this run
    also evaluates on a user's own file, so it calibrates on its calibration part only; ``state``:
    where it saves its progress, see :func:`measure_state`)."""
    from calibration.data import DEFAULT_SOURCE, calibration_windows, own_text_split

    from .measure import measure_sensitivity
    from .units import parse_candidates

    opts.check()
    candidates = parse_candidates(opts.candidates.split(","), config.group_size, opts.keep)
    calib = run["calib"] or DEFAULT_SOURCE
    log.info("measuring sensitivity: %d × %d tokens of %s for H_x, %d × %d for traces and loss increases",
             run["nsamples"], run["seqlen"], calib, opts.loss_samples, opts.loss_seqlen)
    part = own_text_split(calib, "calib", shared=shared)
    windows = calibration_windows(tokenizer, calib, run["nsamples"], run["seqlen"], run["seed"], part)
    loss_windows = calibration_windows(tokenizer, calib, opts.loss_samples, opts.loss_seqlen, run["seed"] + 1, part)
    torch.manual_seed(run["seed"])
    settings = {"calib": calib, "nsamples": run["nsamples"], "seqlen": run["seqlen"], "seed": run["seed"],
                "group_size": config.group_size, "candidates": [c.label for c in candidates],
                "request": measure_request(run, config, opts, shared)}
    return measure_sensitivity(model, arch, windows, loss_windows, candidates, config, device, model_name=model_label,
                               granularity=opts.units, trace_method=opts.trace, trace_tol=opts.trace_tol,
                               max_probes=opts.probes, pair_bits=opts.pair_bits or None, pair_window=opts.pair_window,
                               single_bits=opts.single_widths(), context_bits=opts.context_bits or None,
                               context_method=opts.context_method,
                               context_exact_bits=tuple(parse_bits_list(opts.context_exact_bits, "--context-exact-bits")),
                               batch_size=run["batch_size"], seed=run["seed"], progress=progress, settings=settings,
                               state=state)



def measure_run(run: dict, config: QuantConfig, explicit: set[str], opts: MeasureOptions, out: str,
                restart: bool = False, progress: bool = True) -> tuple[Sensitivity, Path]:
    """`hmq measure`: check ``out`` before any work, load the model streamed, measure, save. Its
    progress is saved in ``<out>.partial``: the same command after a kill goes on from there
    (``restart``: discard it and start afresh)."""

    from quant import dist
    from quant.export import check_writable
    from quant.pipeline import load_resolved

    if not str(out).strip():
        raise ConfigError("--out must name a file, e.g. m.sens.")
    if Path(out).expanduser().is_dir():
        raise ConfigError(f"--out {out!r} is a folder: name a file, e.g. {Path(out) / 'm.sens'}.")
    check_writable(Path(out))
    if dist.launched():
        run = {**run, "device": dist.init(run["device"])}
    model, tokenizer, arch, config, device, _ = load_resolved(run, config, explicit)
    label = run["model"] or "SmolLM2-135M-Instruct"
    state = measure_state(f"{out}.partial", run, config, opts, False, model, arch, device, restart)
    sens = measure_model(model, tokenizer, arch, config, run, opts, device, label, progress=progress, state=state)
    path = sens.save(out) if dist.is_main() else Path(out)  # one process writes
    state.finish()
    return sens, path


def eval_run(spec: str | None, data: str | None, seqlen: int, max_windows: int | None, baseline: bool,
             dtype: str = "auto", device: str = "auto", progress: bool = True, kl: bool = False,
             reference: str | None = None) -> list[dict]:
    """`hmq eval`: perplexity of ``spec`` (an hmq checkpoint, or anything `quantize --model` takes),
    and with ``baseline`` also of the fp model the checkpoint came from. With ``kl`` (or a
    ``reference`` model) the reference (default: that fp model) runs beside it in the same layer
    sweep and the result also holds the KL divergence of the model's next-token distribution from
    the reference's, its percentiles and top-1 agreement; the reference's own perplexity is the
    second result. A user's own file is evaluated whole; a built-in source on its reporting part."""
    from quant import dist
    from quant.evaluate import perplexity
    from quant.model_io import resolve_device, resolve_dtype

    from .data import DEFAULT_SOURCE, eval_tokens, own_text_split

    kl = kl or reference is not None
    if dist.launched():  # each process evaluates a share of the windows
        device = dist.init(device)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = _source_of(spec) if (baseline or (kl and reference is None)) else None
    part = own_text_split(data, "eval")
    results, targets = [], [spec, source] if baseline else [spec]  # targets: evaluated one after the other below
    if kl:  # both models in one sweep: nothing of either is held across layers, no logits are kept
        against = reference if reference is not None else source
        with dist.main_first():
            model, tokenizer = _load_for_eval(spec, dtype)
            ref_model, _ = _load_for_eval(against, dtype)
        name, ids = eval_tokens(tokenizer, data or DEFAULT_SOURCE, part)
        log.info("evaluating on %s %s, KL against %s", "the whole of" if part == "all" else "the reporting part of",
                 name, _named(against))
        res = perplexity(model, ids, seqlen, max_windows, device, progress=progress, reference_model=ref_model)
        ref_res = res.pop("reference")
        del model, ref_model
        results = [{**res, "model": _named(spec), "data": name, "reference_model": _named(against)},
                   {**ref_res, "model": _named(against), "data": name,
                    "role": "baseline" if reference is None else "reference"}]
        targets = [source] if baseline and reference is not None else []  # the source, beside another reference
    for target in targets:
        with dist.main_first():
            model, tokenizer = _load_for_eval(target, dtype)
        name, ids = eval_tokens(tokenizer, data or DEFAULT_SOURCE, part)
        log.info("evaluating on %s %s", "the whole of" if part == "all" else "the reporting part of", name)
        res = perplexity(model, ids, seqlen, max_windows, device, progress=progress)
        res.update({"model": _named(target), "data": name})
        if results:
            res["role"] = "baseline"
        results.append(res)
        del model
    return results


def _named(target: str | None) -> str:
    return target or "offline default (SmolLM2-135M-Instruct)"


def _source_of(spec: str | None) -> str | None:
    """The fp model an hmq checkpoint was made from (``None``: the offline default)."""
    import json

    from quant.export import CheckpointError
    from quant.loading import is_quantized_checkpoint

    if not (spec and is_quantized_checkpoint(spec)):
        raise CheckpointError("--baseline and --kl need --model to be an hmq checkpoint (its source model is the "
                              "baseline), or name the reference with --reference MODEL.")
    meta_file = Path(spec).expanduser() / "hmq.json"
    return json.loads(meta_file.read_text()).get("source_model") if meta_file.is_file() else None


def _load_for_eval(spec: str | None, dtype):
    import transformers

    from quant.loading import is_quantized_checkpoint, load_quantized
    from quant.model_io import load_model

    if spec and is_quantized_checkpoint(spec):
        return load_quantized(spec, dtype=dtype), transformers.AutoTokenizer.from_pretrained(spec)
    model, tokenizer, _ = load_model(spec, dtype, stream=True)
    return model, tokenizer

@dataclass
class AllocOptions:
    """How a measurement becomes an allocation (the allocation flags)."""

    objective: str = "hessian"
    pairs: bool = True
    gain_scale: float = CONTEXT_GAIN_SCALE
    ties: tuple = ()  # pairs of units that must share a candidate (the engine runs them as one module)


@dataclass
class Bisection:
    model: object
    report: object
    allocation: dict
    config: QuantConfig


def bisect_run(sens: Sensitivity, config: QuantConfig, alloc_opts: AllocOptions, load, windows, eval_ids, fp_model,
               device, limit: float, steps: int = 5, eval_seqlen: int = 512, eval_windows: int = 8,
               batch_size: int = 8) -> Bisection:
    """The smallest budget whose measured held-out perplexity is within ``limit`` (a fraction) of
    the fp model's: each step quantizes a fresh model from ``load()`` and evaluates it."""
    from quant.allocate import bisect_budget
    from quant.evaluate import perplexity

    from .mixed import allocate, config_for, min_max_bpw, quantize_and_eval, total_params

    fp = perplexity(fp_model, eval_ids, eval_seqlen, eval_windows, device, progress=False)["ppl"]
    target = fp * (1 + limit)
    log.info("fp perplexity %.3f on %d held-out windows; target ≤ %.3f", fp, eval_windows, target)
    lo, hi = min_max_bpw(sens)
    n = total_params(sens)
    kept: dict = {}

    def measure(bpw):
        alloc = solved_once(lambda: allocate(sens, bpw * n / 8, alloc_opts.objective, alloc_opts.pairs,
                                             gain_scale=alloc_opts.gain_scale, ties=alloc_opts.ties))
        cfg = config_for(sens, alloc, config)
        ppl, report, qmodel, _ = quantize_and_eval(load, windows, cfg, device, eval_ids, eval_seqlen, eval_windows,
                                                   batch_size)
        log.info("bisection: %.3f bpw -> ppl %.3f (target %.3f)", alloc.bpw, ppl, target)
        if ppl <= target and (not kept or alloc.bpw < kept["alloc"].bpw):
            kept.update(model=qmodel, report=report, alloc=alloc, config=cfg)
        return ppl

    _, history = bisect_budget(measure, lo, hi, lambda ppl: ppl <= target, steps=steps)
    a = kept["alloc"].to_dict()
    a["bisection"] = [{"budget": b, "ppl": p} for b, p in history]
    a["fp_ppl"], a["target_ppl"] = fp, target
    return Bisection(kept["model"], kept["report"], a, kept["config"])


@dataclass
class FrontierOptions:
    verify: int = 0
    uniform_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    map_budget: float = 3.0
    eval_windows: int = 8
    eval_seqlen: int = 512
    nsamples: int = 32
    seqlen: int = 512
    batch_size: int = 8


def frontier_run(sens: Sensitivity, model, tokenizer, load, device, alloc_opts: AllocOptions,
                 opts: FrontierOptions) -> dict:
    """The predicted frontier on a grid of budgets, ``opts.verify`` of its points quantized and
    measured, uniform RTN and GPTQ beside them, and a bit map: the ``frontier.json`` payload (with
    ``heat``, the bit map's allocation, for the plot)."""
    from calibration.data import calibration_windows, eval_tokens
    from quant.evaluate import perplexity

    from .mixed import allocate, base_config, config_for, frontier_allocations, min_max_bpw, predicted_ppl, \
        quantize_and_eval, total_params

    calib = sens.settings.get("calib")
    _, ids = eval_tokens(tokenizer, calib)
    fp = perplexity(model, ids, opts.eval_seqlen, opts.eval_windows, device, progress=False)["ppl"]
    obj, pairs, gs = alloc_opts.objective, alloc_opts.pairs, alloc_opts.gain_scale
    lo, hi = min_max_bpw(sens)
    front = solved_once(lambda: frontier_allocations(sens, np.linspace(lo, min(hi, 8.5), 41), obj, pairs, gain_scale=gs))
    predicted = [{"bpw": a.bpw, "predicted_dloss": a.predicted_dloss, "predicted_ppl": predicted_ppl(fp, a.predicted_dloss),
                  "units": dict(zip(a.unit_names, a.candidates))} for a in front]
    base = base_config(sens)
    windows = calibration_windows(tokenizer, calib, opts.nsamples, opts.seqlen, sens.settings.get("seed", 0))
    n = total_params(sens)
    widths = [c.bits for c in sens.candidates]
    u4 = 8 * sum(sens.cost[k][widths.index(4)] for k in range(len(sens.units))) / n if 4 in widths else hi
    verified, uniform = [], []
    for bpw in (np.linspace(lo + 0.25, u4 + 0.1, opts.verify) if opts.verify else []):
        alloc = solved_once(lambda: allocate(sens, bpw * n / 8, obj, pairs, gain_scale=gs))
        ppl, *_ = quantize_and_eval(load, windows, config_for(sens, alloc, base), device, ids, opts.eval_seqlen,
                                    opts.eval_windows, opts.batch_size)
        verified.append({"bpw": alloc.bpw, "ppl": ppl, "predicted_ppl": predicted_ppl(fp, alloc.predicted_dloss),
                         "units": dict(zip(alloc.unit_names, alloc.candidates))})
        log.info("verified %.3f bpw: ppl %.3f (predicted %.3f)", alloc.bpw, ppl, verified[-1]["predicted_ppl"])
    for method in ("rtn", "gptq"):
        for bits in (opts.uniform_bits if opts.verify else []):
            cfg = QuantConfig(**{**base.to_dict(), "method": method, "bits": bits})
            ppl, report, *_ = quantize_and_eval(load, windows, cfg, device, ids, opts.eval_seqlen, opts.eval_windows,
                                                opts.batch_size)
            uniform.append({"method": method, "bits": bits, "bpw": report.bpw, "ppl": ppl})
            log.info("uniform %s w%d: %.3f bpw, ppl %.3f", method, bits, report.bpw, ppl)
    heat = solved_once(lambda: allocate(sens, max(opts.map_budget, lo) * n / 8, obj, pairs, gain_scale=gs))
    return {"model": sens.model, "objective": obj, "pairs": pairs, "fp_ppl": fp, "eval_windows": opts.eval_windows,
            "predicted": predicted, "verified": verified, "uniform": uniform, "bit_map": heat.to_dict(), "heat": heat}


def engine_candidates(engine: str, fmt: str, candidates: str, units: str, pair_bits: int | None,
                      is_default: bool) -> tuple[str, int | None]:
    """Before any work: the candidate list (and pair width) narrowed to the widths ``engine`` runs in
    ``fmt`` (the default list quietly, with a log line; a list the user gave is refused), after
    refusing a layout or unit granularity the engine cannot load mixed."""
    from quant.export import ENGINE_RULES

    rule = ENGINE_RULES.get((engine, fmt))
    if rule is None:
        return candidates, pair_bits  # named by the export's own check
    _check_mixed_layout(rule, engine, fmt, units, measured=False)
    items = [c.strip() for c in candidates.split(",") if c.strip()]
    bits_of = {c: c.lower().removeprefix("w").partition("g")[0] for c in items}
    odd = [c for c in items if bits_of[c].isdigit() and int(bits_of[c]) not in (*rule.bits, 16)]
    if not odd:
        return candidates, pair_bits
    if not is_default:
        raise ConfigError(f"--candidates {','.join(odd)}: {engine} does not run those widths as {fmt} (it runs "
                          f"{'/'.join(map(str, rule.bits))}-bit): drop them, or export --format gptq.")
    candidates = ",".join(c for c in items if c not in odd)
    kept = sorted({int(bits_of[c]) for c in items if c not in odd})
    if pair_bits and pair_bits not in kept:
        pair_bits = kept[0]
    log.info("%s runs %s at %s bits: measuring candidates %s (pairs at %d bits)", engine, fmt,
             "/".join(map(str, rule.bits)), candidates, pair_bits or 0)
    return candidates, pair_bits


def check_measurement_for_engine(sens: Sensitivity, engine: str, fmt: str) -> None:
    """A measurement given with --sensitivity holds only what ``engine`` runs in ``fmt``."""
    from quant.export import ENGINE_RULES

    rule = ENGINE_RULES[(engine, fmt)]
    odd = sorted({c.bits for c in sens.candidates if c.bits != 16 and c.bits not in rule.bits})
    if odd:
        raise ConfigError(f"the measurement's candidates include {'/'.join(map(str, odd))}-bit, which {engine} does "
                          f"not run as {fmt}: re-run `hmq measure --candidates "
                          f"{','.join(map(str, sorted({c.bits for c in sens.candidates if c.bits in rule.bits})))}` "
                          "or export --format gptq.")
    _check_mixed_layout(rule, engine, fmt, sens.settings.get("granularity", "fused"), measured=True)


def _check_mixed_layout(rule, engine: str, fmt: str, units: str, measured: bool) -> None:
    """``engine`` loads ``fmt`` with a scheme per module, and ``units`` (the unit granularity) is one it
    can run: a fusing engine needs one scheme per fused group (``measured``: the error names the
    measurement's granularity)."""
    if rule.fused and units == "linear":
        raise ConfigError(f"{engine} runs q/k/v and gate/up as fused matmuls with one scheme each"
                          + (", but this measurement has --units linear" if measured else "")
                          + ": measure with --units fused, or target --engine gptqmodel/hmq.")
    if not rule.per_module:
        raise ConfigError(f"{engine} loads {fmt} checkpoints with one scheme for every linear only: for mixed "
                          "precision export --format compressed-tensors or target --engine gptqmodel/vllm.")
