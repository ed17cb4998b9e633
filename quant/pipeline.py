"""The sequential pipeline: capture the first decoder layer's inputs, then quantize one layer at a
time on the working device and feed its *quantized* outputs to the next layer (GPTQ, §4
"Implementation details"), so peak memory is about one layer plus the calibration activations."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import dist
from .capture import LayerInput, Replay, collect_hessians, run_layer

from .arch import Arch, decoder_layers, set_submodule
from .config import ConfigError, ModuleSpec, QuantConfig
from .engine import sweep, visit
from .stream import detach_store
from .methods import get_method, solve
from .qlinear import QuantLinear
from .quantizer import best_rows
from .resume import placed

if TYPE_CHECKING:
    from .resume import LayerState

log = logging.getLogger("hmq")


@dataclass
class ModuleResult:
    name: str
    bits: int
    group_size: int
    params: int
    bytes: int  # storage of the weight: packed codes + scales + zeros, or fp16 when kept
    seconds: float


@dataclass
class QuantReport:
    modules: list[ModuleResult] = field(default_factory=list)
    seconds: float = 0.0
    affine_loss: list[list[float]] = field(default_factory=list)  # affine methods: per layer, per epoch
    learned_grid_rows: list[float] = field(default_factory=list)  # affine+gptq: per layer, share of rows on the learned grid
    range_picks: list[str] = field(default_factory=list)  # clip_layer: per decoder layer, the range search kept

    @property
    def bpw(self) -> float:
        return 8 * sum(m.bytes for m in self.modules) / max(1, sum(m.params for m in self.modules))


def module_specs(model: nn.Module, arch: Arch, config: QuantConfig) -> dict[str, ModuleSpec]:
    """Spec of every quantizable linear (full name -> spec); checks that fused groups agree."""
    specs = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        prefix, here = f"{arch.layers}.{i}.", arch.at(layer)
        for name in here.linears:
            specs[prefix + name] = config.spec_for(prefix + name)
        for group in () if config.unfused else here.fused:
            distinct = {specs[prefix + n] for n in group}
            if len(distinct) > 1:
                detail = ", ".join(f"{n}={specs[prefix + n].bits}b/g{specs[prefix + n].group_size}" for n in group)
                raise ConfigError(
                    f"layer {i}: {', '.join(group)} are run as one fused matmul by inference engines and must share "
                    f"bits, group size and sym, but got {detail}: make the overrides cover the whole group."
                )
    return specs


def fp16_bytes(linear: nn.Linear) -> int:
    return linear.weight.numel() * 2


@torch.no_grad()
def quantize_model(model: nn.Module, arch: Arch, windows: torch.Tensor, config: QuantConfig,
                   device: torch.device, batch_size: int = 8, progress: bool = True,
                   state: "LayerState | None" = None) -> QuantReport:
    """Quantize ``model`` in place, replacing its linears with :class:`QuantLinear`. ``state``: save
    each finished layer there, and begin after the layers it already holds (a resumed run)."""
    method = get_method(config.method)
    arch.adapt(decoder_layers(model, arch))  # a model built in Python still holds Conv1D linears or fused experts
    specs = module_specs(model, arch, config)
    for name, spec in specs.items():  # fail before any work on shapes that cannot be grouped or packed
        if not spec.keep:
            _check_shape(model.get_submodule(name), name, spec, config.partial_groups)
    report = QuantReport()
    t_start = time.perf_counter()
    if method.affine:
        from . import affine

        missing = [n for n in affine.LINEARS if n not in arch.linears]
        if missing or arch.experts:
            lacks = "has mixture-of-experts blocks" if arch.experts else f"lacks {missing}"
            raise ConfigError(f"--method {config.method} needs a Llama-like block (q/k/v/o, gate/up/down, two RMSNorms); "
                              f"this architecture {lacks}: use --method gptq or rtn.")
        heads = affine.Heads.of(model.config)
        settings = affine.AffineSettings(epochs=config.affine_epochs, lr=config.affine_lr, clip_lr=2 * config.affine_lr,
                                         batch_size=config.affine_batch)
        check_affine_batch(config)
        spread = affine.Spread(dist.world(), -(-windows.shape[0] // batch_size), dist.all_reduce_sum)
    fp_stream: dict = {}  # affine methods: the full-precision stream they learn to match

    def step(i, layer, inputs):
        grids = None
        prefix, here = f"{arch.layers}.{i}.", arch.at(layer)
        steps = here.sequential if config.true_sequential else (here.linears,)
        if method.affine:
            fp_inputs = fp_stream.get("inputs", inputs)
            fp_outputs = run_layer(layer, fp_inputs)
            layer_specs = {n: (None if specs[prefix + n].keep else specs[prefix + n]) for n in here.linears}
            T, info = affine.learn_block(layer, heads, layer_specs, inputs, [o.hidden for o in fp_outputs], settings,
                                         name=f"layer {i}", spread=spread)
            affine.fold(layer, T, name=f"layer {i}")
            if method.needs_hessian:  # GPTQ rounds on the learned clipped grid, with error feedback
                grids = affine.learned_grid(layer, T, layer_specs)
            else:  # RTN: its min/max grid becomes the learned clipped grid
                affine.clamp_to_clip(layer, T, layer_specs)
            report.affine_loss.append(info["loss"])
            fp_stream["inputs"] = fp_outputs
        results = quantize_layer_picked(layer, prefix, steps, here, inputs, specs, config, method, grids)
        pick = results.pop("__search__", None)
        if pick is not None:
            report.range_picks.append(pick)
        outputs = results.pop("__outputs__")
        kept, solved = results.pop("__grid_rows__")
        if solved:
            report.learned_grid_rows.append(kept / solved)
        rows = []
        for n in here.linears:
            linear = layer.get_submodule(n)
            if n in results:
                qw, secs = results[n]
                qlinear = QuantLinear.from_quantized(qw, linear.bias, dtype=linear.weight.dtype)
                set_submodule(layer, n, qlinear)
                rows.append(ModuleResult(prefix + n, qw.bits, qw.group_size, linear.weight.numel(),
                                         qlinear.storage_bytes, secs))
            else:
                rows.append(ModuleResult(prefix + n, 16, -1, linear.weight.numel(), fp16_bytes(linear), 0.0))
        report.modules.extend(rows)
        if state is not None:
            meta = {"modules": [dataclasses.asdict(r) for r in rows], "affine_loss": report.affine_loss[-1:] if method.affine else [],
                    "grid_rows": report.learned_grid_rows[-1:] if solved else [],
                    "range_pick": [pick] if pick is not None else []}
            streams = {"hidden": [o.hidden for o in outputs]} if outputs is not None else {}
            if "inputs" in fp_stream:
                streams["fp"] = [o.hidden for o in fp_stream["inputs"]]
            state.save(i, layer, meta, streams)
        return outputs

    start = _restore(model, arch, state, report, progress) if state is not None else 0

    def resume(inputs):
        streams = state.streams()
        if inputs is None:
            return None
        if "fp" in streams:
            fp_stream["inputs"] = placed(streams["fp"], inputs)
        return placed(streams["hidden"], inputs)

    # methods that use no activations (RTN) need no calibration forward passes at all
    windows = dist.shard_batches(windows, batch_size) if method.needs_inputs else None  # this process's batches
    sweep(model, arch, windows, device, step, batch_size=batch_size, keep=True,
          progress=progress, desc=f"{config.method} layers", start=start, resume=resume)
    detach_store(model)  # every layer is quantized and in memory now: nothing to read from the shards again
    report.seconds = time.perf_counter() - t_start
    return report


def _restore(model: nn.Module, arch: Arch, state, report: QuantReport, progress: bool) -> int:
    """Put the layers ``state`` holds back into ``model`` and their rows into ``report``; returns
    the first layer still to quantize."""
    if state.done:
        log.info("resuming from %s: %d of %d decoder layers were already quantized", state.folder, state.done,
                 len(decoder_layers(model, arch)))
    for i, layer in visit(model, arch, range(state.done), torch.device("cpu"), keep=True, progress=progress,
                          desc="saved layers"):
        meta = state.restore(i, layer)
        report.modules.extend(ModuleResult(**m) for m in meta["modules"])
        report.affine_loss.extend(meta["affine_loss"])
        report.learned_grid_rows.extend(meta["grid_rows"])
        report.range_picks.extend(meta.get("range_pick", []))
    return state.done


def range_searches(config: QuantConfig, method, grids: dict | None, inputs, bits: list[int]) -> dict[str, QuantConfig]:
    """The range searches a decoder layer whose quantized linears are at ``bits`` is solved with, by
    name, each as a config of its own: where ``clip_layer`` applies (GPTQ, weighted range search, no
    learned grids, calibration inputs at hand, :meth:`QuantConfig.clip_layer_for`) the weighted search
    alone, the unweighted one and, with ``clip_both``, the row mix; otherwise ``config`` alone."""
    if not (config.clip_layer_for(bits) and config.clip and config.clip_weighted and method.needs_hessian
            and grids is None and inputs is not None):
        return {"": config}
    options = {"weighted": dataclasses.replace(config, clip_both=False, clip_layer="off"),
               "unweighted": dataclasses.replace(config, clip_weighted=False, clip_layer="off")}
    if config.clip_both:
        options["both"] = dataclasses.replace(config, clip_layer="off")
    return options


def output_error(outputs: list[LayerInput], reference: list[LayerInput]) -> torch.Tensor:
    """Summed squared difference of two sets of decoder-layer outputs, float64, on their device (so
    that NCCL can sum it over processes)."""
    err = torch.zeros((), dtype=torch.float64, device=reference[0].hidden.device)
    for o, r in zip(outputs, reference):
        err += (o.hidden.float() - r.hidden.float()).pow(2).sum().double()
    return err


def quantize_layer_picked(layer: nn.Module, prefix: str, steps, arch: Arch, inputs: list[LayerInput] | None,
                          specs: dict[str, ModuleSpec], config: QuantConfig, method, grids: dict | None = None) -> dict:
    """:func:`quantize_layer` once per range search (:func:`range_searches`), each from the layer's fp
    weights (true-sequential inside the layer on its own quantized stream); keeps the results of the
    search whose decoder-layer outputs are nearest the fp layer's on the same inputs (summed squared
    error over every process's windows, so all processes keep the same one), its name in
    ``__search__``. Memory: the fp layer's outputs and two searches' beside the inputs."""
    bits = [specs[prefix + n].bits for n in arch.at(layer).linears if not specs[prefix + n].keep]
    options = range_searches(config, method, grids, inputs, bits)
    if len(options) == 1:
        return quantize_layer(layer, prefix, steps, arch, inputs, specs, config, method, grids)
    linears = {n: layer.get_submodule(n) for n in arch.at(layer).linears}
    fp_weights = {n: lin.weight.data for n, lin in linears.items()}
    reference = run_layer(layer, inputs)
    best, best_err = None, math.inf
    for name, cfg in options.items():
        results = quantize_layer(layer, prefix, steps, arch, inputs, specs, cfg, method)
        for n, lin in linears.items():  # the next search starts from the fp weights again
            lin.weight.data = fp_weights[n]
        err = float(dist.all_reduce_sum(output_error(results["__outputs__"], reference)))
        if err < best_err or best is None:
            best, best_err = results | {"__search__": name}, err
        del results
    return best


def quantize_layer(layer: nn.Module, prefix: str, steps, arch: Arch, inputs: list[LayerInput] | None,
                   specs: dict[str, ModuleSpec], config: QuantConfig, method, grids: dict | None = None) -> dict:
    """Quantize one decoder layer step by step; returns {linear: (QuantizedWeight, seconds)} plus
    ``__outputs__``, the layer's outputs computed with its quantized weights."""
    arch = arch.at(layer)
    results: dict = {}
    grid_rows = [0, 0]  # rows that kept the learned grid, rows solved on one
    replay = Replay()
    done: set[str] = set()
    for group in steps:
        names = [n for n in group if not specs[prefix + n].keep]
        # block replay pays off only when the step runs a pass anyway (methods that need H)
        keep_inputs = tuple(b.out_linear for b in arch.blocks if b.out_linear in group) if method.needs_hessian else ()
        hessians, kept = {}, {}
        if (names and method.needs_hessian) or keep_inputs:
            hessians, kept = collect_hessians(layer, names if method.needs_hessian else [], inputs, prefix,
                                              replay, keep_inputs, arch.shared_input)
        for members in _stacks(names, hessians, specs, prefix, method.row_independent, arch.fused):
            t0 = time.perf_counter()
            linears = [layer.get_submodule(n) for n in members]
            weight = torch.cat([lin.weight for lin in linears]) if len(linears) > 1 else linears[0].weight
            label = prefix + ("{" + ",".join(members) + "}" if len(members) > 1 else members[0])
            if grids is None:
                qw = solve(method, weight, hessians.get(members[0]), specs[prefix + members[0]], config, label)
            else:  # one fixed grid per group, the members' rows stacked like their weights
                grid = [(torch.cat([grids[n][g][0] for n in members]), torch.cat([grids[n][g][1] for n in members]))
                        for g in range(len(grids[members[0]]))]
                H = hessians.get(members[0])
                learned = method.fn(weight, H, specs[prefix + members[0]], config, label, grid=grid)
                own = method.fn(weight, H, specs[prefix + members[0]], config, label)
                # per output row, whichever grid leaves the lower layer-output error: the learned
                # clipping helps at 2-3 bits but can hurt where GPTQ's own grid is already fine
                qw, pick = best_rows([own, learned], weight, H)
                grid_rows[0] += int(pick.sum())
                grid_rows[1] += pick.numel()
            secs = (time.perf_counter() - t0) / len(members)
            row = 0
            for n, lin in zip(members, linears):
                part = qw.rows(row, row + lin.out_features) if len(members) > 1 else qw
                row += lin.out_features
                lin.weight.data = part.dequantize(lin.weight.dtype)  # later steps see the quantized module
                results[n] = (part, secs)
        done.update(group)
        for block in arch.blocks:  # a block whose linears are all final is replayed, not recomputed
            inside = [n for n in arch.linears if n.startswith(block.module + ".")]
            if block.out_linear in kept and all(n in done for n in inside):
                out_linear = layer.get_submodule(block.out_linear)
                outs = [out_linear(x) for x in kept[block.out_linear]]
                replay.outputs[block.module] = [(o, None) for o in outs] if block.returns_tuple else outs
        del hessians, kept
    results["__outputs__"] = run_layer(layer, inputs, replay) if inputs is not None else None
    results["__grid_rows__"] = tuple(grid_rows)
    return results


def _stacks(names: list[str], hessians: dict, specs: dict, prefix: str, row_independent: bool,
            fused: tuple[tuple[str, ...], ...] = ()) -> list[list[str]]:
    """Modules of one fused group (q/k/v, one expert's gate/up) that share ``H`` (same input) and spec
    are solved as one stacked weight. (All experts of a MoE block share ``H`` too, but stacking them
    would hold a (experts × 2I, H) weight at once: 3.8 GB in fp32 for Mixtral-8x7B.)"""
    group_of = {n: k for k, g in enumerate(fused) for n in g}
    stacks: list[list[str]] = []
    for n in names:
        for st in stacks:
            m = st[0]
            if row_independent and m in hessians and hessians[m] is hessians.get(n) and specs[prefix + m] == specs[prefix + n] \
                    and m in group_of and group_of[m] == group_of.get(n):
                st.append(n)
                break
        else:
            stacks.append([n])
    return stacks


def _check_shape(linear: nn.Module, name: str, spec: ModuleSpec, partial_groups: bool) -> None:
    from .packing import check_packable
    from .quantizer import check_groupable

    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"{name} is a {type(linear).__name__}, not nn.Linear: it cannot be quantized by hmq.")
    out_f, in_f = linear.weight.shape
    try:
        check_groupable(in_f, spec.group_size, name, partial_groups)
        check_packable(in_f, spec.bits, f"{name} in_features")
        check_packable(out_f, spec.bits, f"{name} out_features")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


PREFERRED_GROUP_SIZES = (128, 64, 32)


def auto_group_size(model: nn.Module, arch: Arch, config: QuantConfig) -> int:
    """``config.group_size`` if it divides every quantized module's in_features, else the largest
    preferred group size that does."""
    specs_in = {layer.get_submodule(n).in_features for layer in decoder_layers(model, arch) for n in arch.at(layer).linears}
    for gs in (config.group_size, *PREFERRED_GROUP_SIZES):
        if gs == -1 or all(i % gs == 0 for i in specs_in):
            return gs
    return config.group_size


def check_affine_batch(config: QuantConfig) -> None:
    """Under torchrun each affine step spreads its batches over the processes: refuse a step size
    that does not split evenly, naming the fix."""
    if get_method(config.method).affine and config.affine_batch % dist.world():
        raise ConfigError(f"--method {config.method} under {dist.world()} processes spreads each optimizer step's "
                          f"calibration batches over them, and --affine-batch {config.affine_batch} does not split "
                          f"evenly: pass a multiple of {dist.world()} (one process with the same --affine-batch "
                          "learns the same transforms, within rounding).")


def for_processes(config: QuantConfig, explicit: set[str]) -> QuantConfig:
    """``config`` for this run's processes: an affine step not set by the user takes one batch from
    each process (one process with that --affine-batch learns the same transforms)."""
    world = dist.world()
    if world > 1 and get_method(config.method).affine and "affine_batch" not in explicit \
            and config.affine_batch % world:
        log.info("%d processes: each affine step averages %d calibration batches, one from each process (one "
                 "process learns the same transforms, within rounding, with --affine-batch %d)", world, world, world)
        config = dataclasses.replace(config, affine_batch=world)
    check_affine_batch(config)
    return config


def load_resolved(run: dict, config: QuantConfig, explicit: set[str], stream: bool = True):
    """Load ``run["model"]`` (``stream``: layers stay on disk until the sweep needs them) on the
    run's device and dtype, and settle the group size as `quantize` does when it was not given.
    Returns (model, tokenizer, arch, config, device, dtype)."""
    from .model_io import load_model, resolve_device, resolve_dtype

    config = for_processes(config, explicit)  # before loading: a step that cannot be split fails at once
    device = resolve_device(run["device"])
    dtype = resolve_dtype(run["dtype"], device)
    log.info("loading %s", run["model"] or "the offline default model (SmolLM2-135M-Instruct)")
    with dist.main_first():
        model, tokenizer, arch = load_model(run["model"], dtype, stream=stream)
    if "group_size" not in explicit:
        gs = auto_group_size(model, arch, config)
        if gs != config.group_size:
            log.info("group size %d does not divide in_features of this model; using %d (pass --group-size to choose)",
                     config.group_size, gs)
            config = dataclasses.replace(config, group_size=gs)
    return model, tokenizer, arch, config, device, dtype
