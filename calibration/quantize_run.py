"""The whole `hmq quantize` run: load, measure (or read a measurement), allocate under a budget,
refine or bisect, quantize, export. Plain options in, a typed result out; the CLI parses flags into
these options and prints the result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from quant import dist
from quant.config import ConfigError, QuantConfig
from quant.resume import LayerState, discard

from .runs import AllocOptions, MeasureOptions, measure_model

log = logging.getLogger("hmq")

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct"


@dataclass
class SearchOptions:
    """The evolutionary refinement of one budget's allocation (``--search``)."""

    generations: int
    samples: int = 4
    seqlen: int = 512
    offspring: int = 8
    screen: int = 1

    def check(self) -> None:
        if min(self.generations, self.samples, self.seqlen, self.screen) < 1 or self.offspring < 2:
            raise ConfigError("--search takes a number of generations ≥ 1, with --search-samples, --search-seqlen and "
                              "--search-screen ≥ 1 and --search-offspring ≥ 2.")


@dataclass
class BudgetOptions:
    """One budget: bits per weight, bytes, summed latency (with its table) or a perplexity limit."""

    bpw: float | None = None
    gb: float | None = None
    latency: float | None = None
    latency_table: dict | None = None
    max_ppl_increase: float | None = None  # a fraction: 0.05 for 5%
    bisect_steps: int = 5
    eval_windows: int = 8
    eval_seqlen: int = 512

    @property
    def mixed(self) -> bool:
        return any(x is not None for x in (self.bpw, self.gb, self.latency, self.max_ppl_increase))


@dataclass
class QuantizeResult:
    out: Path
    report: object  # quant.pipeline.QuantizeReport
    config: QuantConfig
    allocation: dict | None


def model_label(model: str | None) -> str:
    return Path(model).name.removesuffix(".gguf") if model else DEFAULT_MODEL_LABEL


def quantize_run(run: dict, config: QuantConfig, explicit: set[str], *, out: str | None, overwrite: bool, fmt: str,
                 engine: str, budget: BudgetOptions, measure: MeasureOptions, alloc: AllocOptions,
                 sensitivity: str | None = None, search: SearchOptions | None = None,
                 default_candidates: bool = True, restart: bool = False, progress: bool = True,
                 select=None) -> QuantizeResult:
    """Quantize ``run["model"]`` uniformly (no budget) or mixed, and write the checkpoint to ``out``
    (default ``out/<model>-<method>-<w..g..|mixed>``). ``default_candidates``: the measurement's
    candidates were not chosen by the user, so the engine's may narrow them silently.

    Resumable: each quantized layer is saved in ``<out>.partial`` as it is done, and a measurement
    in ``<out>.sens``; the same run started again after a kill goes on from there (``restart``:
    discard them and start afresh).

    ``select`` (:class:`calibration.select.SelectOptions`): a ``--budget``/``--budget-gb`` run takes
    the default recipe, :func:`calibration.select.select_model`, in place of measure + ILP."""
    from calibration.data import DEFAULT_SOURCE, calibration_windows, own_text_split
    from quant.export import check_output_dir, save_quantized
    from quant.pipeline import load_resolved, quantize_model

    if search is not None:
        search.check()
    if dist.launched():
        run = {**run, "device": dist.init(run["device"])}
    if out:  # before any loading: a bad --out is found in a second, not after the work
        check_output_dir(out, overwrite)
    if budget.mixed and not sensitivity:  # measure only what the target engine runs
        from .runs import engine_candidates

        measure.candidates, measure.pair_bits = engine_candidates(engine, fmt, measure.candidates, measure.units,
                                                                  measure.pair_bits, default_candidates)
    # the model's layers stay on disk until the sweep needs them (measurement and search included)
    model, tokenizer, arch, config, device, dtype = load_resolved(run, config, explicit)
    name = model_label(run["model"])
    tag = "mixed" if budget.mixed else f"w{config.bits}g{config.group_size}"
    out = check_output_dir(out or f"out/{name}-{config.method}-{tag}", overwrite)
    calib = run["calib"] or DEFAULT_SOURCE
    if select is not None and budget.mixed:
        return _select_run(run, config, explicit, model, tokenizer, arch, device, dtype, out, calib, budget, measure,
                           select, fmt, engine, overwrite, restart, progress)
    shared = budget.max_ppl_increase is not None  # the bisection evaluates on the calibration source too
    sens = None
    if budget.mixed:
        sens, config = _sensitivity(sensitivity, run, config, explicit, measure, model, tokenizer, arch, device,
                                    out, shared, restart, progress)
        from .runs import check_measurement_for_engine

        check_measurement_for_engine(sens, engine, fmt)
        if engine == "vllm":  # its fused-MoE layers run one scheme for all experts of a block
            import dataclasses

            from .mixed import expert_ties

            alloc = dataclasses.replace(alloc, ties=tuple(expert_ties(sens.units)))
    # a user's own file is calibrated on whole, unless this run also evaluates on it (bisection)
    part = own_text_split(calib, "calib", shared=shared)
    log.info("calibration: %d × %d tokens of %s%s (seed %d)", run["nsamples"], run["seqlen"],
             "the whole of " if part == "all" else "the calibration part of ", calib, run["seed"])
    windows = calibration_windows(tokenizer, calib, run["nsamples"], run["seqlen"], run["seed"], part)
    torch.manual_seed(run["seed"])
    allocation = None
    if budget.max_ppl_increase is not None:
        from calibration.data import eval_tokens

        from .runs import bisect_run

        _, ids = eval_tokens(tokenizer, calib)
        res = bisect_run(sens, config, alloc, lambda: load_quantizable(run, dtype), windows, ids, model, device,
                         budget.max_ppl_increase, budget.bisect_steps, budget.eval_seqlen, budget.eval_windows,
                         run["batch_size"])
        model, report, allocation, config = res.model, res.report, res.allocation, res.config
    else:
        identity = _state_settings(run, config, model, arch, dtype, device, budget, alloc, sens, search)
        state = LayerState(f"{out}.partial", identity, restart, "quantize run")
        if budget.mixed:
            config, allocation = _chosen(state, sens, budget, alloc, search, run, model, tokenizer, arch, windows,
                                         config, device, calib, progress, restart)
        check_engine_early(model, arch, config, fmt, engine)
        report = quantize_model(model, arch, windows, config, device, run["batch_size"], progress=progress,
                                state=state)
    extra = {"source_model": run["model"], "calibration": {k: run[k] for k in ("nsamples", "seqlen", "seed")} | {"source": calib},
             "quantize_seconds": report.seconds}
    if allocation is not None:
        allocation = extra["allocation"] = {**allocation, "objective": alloc.objective}
    if dist.is_main():
        save_quantized(model, tokenizer, out, config, overwrite=overwrite, extra=extra, fmt=fmt, engine=engine)
    if budget.max_ppl_increase is None:
        state.finish()  # waits for the checkpoint
    return QuantizeResult(out, report, config, allocation)


def _state_settings(run: dict, config: QuantConfig, model, arch, dtype, device, budget: BudgetOptions,
                    alloc: AllocOptions, sens, search: SearchOptions | None) -> dict:
    """What identifies a quantize run's saved layers: the model's weights, the calibration, the
    dtype and kind of device the layers were computed in, every quantization setting and, for a
    mixed run, what its allocation is made from (the measurement, the budget and the objective)."""
    import dataclasses
    import hashlib
    import json

    from .units import build_units, fingerprint

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    settings = {"model": fingerprint(model, build_units(model, arch, "linear")), "config": config.to_dict(),
                "calibration": {k: run[k] for k in ("calib", "nsamples", "seqlen", "seed", "batch_size")},
                "compute": {"dtype": str(dtype), "device": torch.device(device).type}}
    if budget.mixed and sens is not None:
        settings["allocation"] = {"measurement": digest([sens.fingerprint, sens.settings]),
                                  "budget": digest(dataclasses.asdict(budget)),
                                  "objective": {k: v for k, v in dataclasses.asdict(alloc).items() if k != "ties"}
                                  | ({"ties": digest(alloc.ties)} if alloc.ties else {}),
                                  "search": dataclasses.asdict(search) if search is not None else None}
    return settings


def _chosen(state: LayerState, sens, budget, alloc, search, run, model, tokenizer, arch, windows, config, device,
            calib, progress, restart: bool = False) -> tuple[QuantConfig, dict]:
    """A mixed run's config and allocation: the one its first start chose (kept in ``state``: an
    ILP under a time limit need not choose the same twice), else chosen now (the ILP by the first
    process for all of them, the search by all together)."""
    from .mixed import config_for

    if state.extra.get("config"):
        log.info("using the allocation the first start of this run chose (kept in %s)", state.folder)
        discard(_search_folder(state))  # a kill may have come before the search's folder went
        return QuantConfig.from_dict(state.extra["config"]), state.extra["allocation"]
    chosen, record, searched = _allocation(sens, budget, alloc, search, run, model, tokenizer, arch, windows, config,
                                           device, calib, progress, state, restart)
    shared = {"config": config_for(sens, chosen, config).to_dict(),
              "allocation": chosen.to_dict() | ({"search": record} if record is not None else {})}
    state.record("allocation", shared["allocation"])
    state.record("config", shared["config"])  # kept before the search's own state goes
    if searched is not None:
        searched.finish()
    return QuantConfig.from_dict(shared["config"]), shared["allocation"]


def load_quantizable(run: dict, dtype):
    from quant.model_io import load_model

    return load_model(run["model"], dtype, stream=True)


def _sensitivity(path, run, config, explicit, measure, model, tokenizer, arch, device, out: Path, shared: bool,
                 restart: bool, progress: bool):
    """The measurement from ``path``, or the one an earlier start of this same run kept beside
    ``out``, or measured now and kept there; and the run's config settled to what it was measured with."""
    from .mixed import as_measured, base_config
    from .runs import measure_request, measure_state
    from .sensitivity import Sensitivity

    kept = Path(f"{out}.sens")
    request = measure_request(run, config, measure, shared)
    if not path and not restart and kept.is_file():
        earlier = Sensitivity.load(kept)
        if earlier.settings.get("request") == request:
            log.info("using %s, which an earlier start of this run measured with the same settings (pass --restart "
                     "to measure again)", kept)
            path = kept
            discard(Path(f"{kept}.partial"))  # a kill may have come before the measurement's folder went
        else:
            log.info("%s was measured with other settings: measuring again (it will be replaced)", kept)
    if path:
        sens = Sensitivity.load(path)
        sens.check_model(model, arch)
    else:
        state = measure_state(f"{kept}.partial", run, config, measure, shared, model, arch, device, restart)
        sens = measure_model(model, tokenizer, arch, config, run, measure, device, run["model"] or DEFAULT_MODEL_LABEL,
                             shared=shared, progress=progress, state=state)
        if dist.is_main():
            log.info("kept the measurement as %s (pass it as --sensitivity next time)", sens.save(kept))
        state.finish()
    if sens.settings.get("method") != config.method:
        log.warning("the sensitivity was measured with %s perturbations but this run quantizes with %s: the "
                    "predicted damage may not match (re-run `hmq measure --method %s`)",
                    sens.settings.get("method"), config.method, config.method)
    config = as_measured(config, sens.solver, explicit)
    return sens, base_config(sens, config)


def _allocation(sens, budget: BudgetOptions, alloc: AllocOptions, search: SearchOptions | None, run, model, tokenizer,
                arch, windows, config, device, calib, progress, state: LayerState | None = None,
                restart: bool = False):
    """The ILP's allocation under ``budget``, refined by ``search`` when given; returns it, the
    search's record (or None) and the search's saved state (or None), which the caller finishes.
    The search saves its progress beside ``state`` (the quantize run's), in ``<out>.search.partial``,
    belonging to the run's settings and the ILP's allocation it starts from."""
    import dataclasses

    from quant.allocate import Solution

    from .mixed import allocate, allocate_latency, allocation_of, budget_to_bytes

    chosen = None
    if state is not None and state.extra.get("ilp"):  # the search an earlier start began goes on from its start
        ilp = state.extra["ilp"]
        chosen = allocation_of(sens, Solution(**ilp["solution"]), ilp["budget"])
    elif dist.is_main():  # one solve (under a time limit two need not agree), for every process
        if budget.latency is not None:
            chosen = allocate_latency(sens, budget.latency_table, budget.latency, alloc.objective, alloc.pairs,
                                      gain_scale=alloc.gain_scale, ties=alloc.ties)
        else:
            chosen = allocate(sens, budget_to_bytes(sens, budget.bpw, budget.gb), alloc.objective, alloc.pairs,
                              gain_scale=alloc.gain_scale, ties=alloc.ties)
    chosen = dist.gather_all(chosen)[0]
    if state is not None and search is not None:
        state.record("ilp", {"solution": dataclasses.asdict(chosen.solution), "budget": chosen.budget})
    log.info("allocation: %.3f bpw, predicted ΔNLL %.4f, solver %s (gap ≤ %.2g) in %.2f s",
             chosen.bpw, chosen.predicted_dloss, chosen.solution.status, chosen.solution.gap, chosen.solution.seconds)
    if search is None:
        return chosen, None, None
    from calibration.data import calibration_windows, own_text_split

    from .mixed import make_problem, search_allocation

    loss_windows = calibration_windows(tokenizer, calib, search.samples, search.seqlen, run["seed"] + 1,
                                       own_text_split(calib, "calib"))
    log.info("search: %d generations × %d children, scored on %d × %d tokens of %s", search.generations,
             search.offspring, search.samples, search.seqlen, calib)
    problem = make_problem(sens, alloc.objective, alloc.pairs, budget.latency_table, alloc.gain_scale, alloc.ties)
    saved = None
    if state is not None:
        saved = LayerState(_search_folder(state), {**state.settings, "start": list(chosen.solution.choice)}, restart,
                           "search")
    new, record = search_allocation(sens, chosen, model, arch, windows, loss_windows, config, device,
                                    search.generations, search.offspring, screen=search.screen, seed=run["seed"],
                                    progress=progress, latency=budget.latency_table, problem=problem, state=saved,
                                    batch_size=run["batch_size"])
    new, record = dist.gather_all((new, record))[0]  # equal everywhere; the first process's, to be sure
    log.info("search: calibration loss %.4f -> %.4f; %.3f bpw", record["start_score"], record["score"], new.bpw)
    return new, record, saved


def _select_run(run, config, explicit, model, tokenizer, arch, device, dtype, out: Path, calib: str, budget: BudgetOptions,
                measure: MeasureOptions, select, fmt: str, engine: str, overwrite: bool, restart: bool,
                progress: bool) -> QuantizeResult:
    """The default recipe (:mod:`calibration.select`): calibration from the calibration part of the
    text, the search scored on its selection part, the chosen model written."""
    import dataclasses

    from calibration.data import calibration_windows
    from quant.export import save_quantized

    from .select import SelectRun, select_model, selection_windows

    if budget.latency is not None or budget.max_ppl_increase is not None:
        raise ConfigError("the default recipe takes --budget or --budget-gb; for --budget-latency or "
                          "--max-ppl-increase add --recipe measure.")
    items = [c.strip() for c in measure.candidates.split(",") if c.strip()]
    if not all(c.isdigit() for c in items):
        raise ConfigError(f"--candidates {measure.candidates}: the default recipe takes bit widths at --group-size "
                          "(e.g. 2,3,4,8); for candidates with their own group size add --recipe measure.")
    for w in sorted({int(c) for c in items}):  # the export's engine rules, before any work
        check_engine_early(model, arch, dataclasses.replace(config, bits=w), fmt, engine)
    log.info("calibration: %d × %d tokens of the calibration part of %s (seed %d); selection: %d × %d tokens of "
             "its selection part", run["nsamples"], run["seqlen"], calib, run["seed"], select.pool_size + select.confirm,
             select.seqlen)
    windows = calibration_windows(tokenizer, calib, run["nsamples"], run["seqlen"], run["seed"], "calib")
    select_windows = selection_windows(tokenizer, calib, select, run["seed"])
    identity = _state_settings(run, config, model, arch, dtype, device, budget, None, None, None)
    identity["selection"] = {"budget": dataclasses.asdict(budget), "candidates": measure.candidates,
                             "keep": measure.keep, "units": measure.units, "engine": engine}
    srun = SelectRun(budget.bpw, budget.gb, ",".join(items), measure.keep, measure.units, engine == "vllm",
                     f"{out}.select.partial", identity, restart)
    torch.manual_seed(run["seed"])
    report, config, record = select_model(model, arch, config, windows, select_windows, device, srun, select,
                                          seed=run["seed"], batch_size=run["batch_size"], progress=progress)
    check_engine_early(model, arch, config, fmt, engine)
    allocation = {**record, "objective": "kl"}
    extra = {"source_model": run["model"], "calibration": {k: run[k] for k in ("nsamples", "seqlen", "seed")}
             | {"source": calib}, "quantize_seconds": report.seconds, "allocation": allocation}
    if dist.is_main():
        save_quantized(model, tokenizer, out, config, overwrite=overwrite, extra=extra, fmt=fmt, engine=engine)
    dist.barrier()
    return QuantizeResult(out, report, config, allocation)


def _search_folder(state: LayerState) -> Path:
    """Where the search of the quantize run saved in ``state`` keeps its progress."""
    return state.folder.with_name(state.folder.name.removesuffix(".partial") + ".search.partial")


def check_engine_early(model, arch, config: QuantConfig, fmt: str, engine: str) -> None:
    """The export's engine rules, checked on the planned schemes before any quantization runs."""
    from quant.export import check_engine
    from quant.pipeline import module_specs

    specs = {n: (None if s.keep else s) for n, s in module_specs(model, arch, config).items()}
    check_engine(specs, arch, fmt, engine)
