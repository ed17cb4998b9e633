"""Quantization settings as validated dataclasses; YAML files in ``configs/`` are only their file form."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16 = keep the module in floating point
GROUP_PARAMS = ("auto", "reached", "original")
REACHED_UP_TO_BITS = 3  # group_params="auto": "reached" at this width and below, "original" above
CLIP_LAYER = ("auto", "on", "off")
CLIP_LAYER_BITS = (3, 4)  # clip_layer="auto": the widths where selection text ranked the per-layer pick first


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message says which and how to fix it."""


def check_bits(bits: int, where: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(
            f"{where}={bits!r} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))} "
            "(16 keeps the module unquantized)."
        )
    return bits


def check_group_size(group_size: int, where: str = "group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size >= 1):
        raise ConfigError(f"{where}={group_size!r} must be -1 (one group per output channel) or a positive integer.")
    return group_size


@dataclass(frozen=True)
class ModuleSpec:
    """The quantization scheme of one linear module."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)

    @property
    def keep(self) -> bool:
        return self.bits == 16


@dataclass
class QuantConfig:
    """Everything ``hmq quantize`` needs to know about *how* to quantize.

    ``overrides`` maps a regex (matched with ``re.search`` against the module's full name, e.g.
    ``model.layers.3.mlp.down_proj``) to a dict with any of ``bits``, ``group_size``, ``sym``.
    The last matching pattern wins, so a per-module bit map from the allocator plugs in here.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    # Columns solved in order of decreasing diag(H) (GPTQ "desc_act") with static groups: the groups
    # stay contiguous, so kernels need no g_idx. On by default: chosen on selection text (docs/defaults.md).
    act_order: bool = True
    static_groups: bool = True  # with act_order; off: groups follow the solve order and need a g_idx
    # static groups: scale/zero from the group's error-updated values when the solve first reaches
    # one of its columns ("reached") or from the original weights before the solve ("original":
    # llm-compressor's static act-order); both keep groups contiguous. "auto" (default): reached at
    # 2-3 bits, original at 4 and 8, as selection text ranked them (docs/defaults.md)
    group_params: str = "auto"
    clip: bool = True  # search each group's range for the lowest |error|^2.4 (GPTQ's "mse") instead of min/max
    # the range search weighs each column's error by its input energy diag(H) where the method has
    # a Hessian (GPTQ), as llama.cpp's importance matrix does (diag(H)^0.5 at 2 bits: ranked on
    # selection text, docs/defaults.md); off: every column counts the same
    clip_weighted: bool = True
    # with the weighted range search, GPTQ also solves with the unweighted one and keeps each output
    # row from the solve whose layer output error ΔW_r H ΔW_rᵀ is lower (selection text, both real
    # models: the weighted search alone lost 56% in KL on Gemma-3 at w3g64; docs/defaults.md)
    clip_both: bool = True
    # GPTQ with the weighted range search: every decoder layer is solved with each search on its own
    # (weighted alone, unweighted alone and, with clip_both, the row mix) and the one whose decoder-layer
    # output is nearest the fp layer's on the same inputs is kept. GPTQ's per-linear objective ranked
    # the searches the same on both real models while their end-to-end KL ranked them differently;
    # the layer's output sees what it misses. "auto" (default): on where a layer has a linear at 3 or
    # 4 bits, where selection text ranked it first (at 2 bits it ranked it below the row mix; 8 bits
    # not tried): docs/defaults.md, *A criterion past the linear*. Uniform runs and quantize's own
    # solves; the mixed database still takes the row mix
    clip_layer: str = "auto"
    damp_percent: float = 0.01  # damping added to diag(H), as a fraction of its mean
    block_size: int = 128  # GPTQ lazy-batch column block
    true_sequential: bool = True  # quantize q/k/v, then o, then gate/up, then down, re-measuring inputs
    partial_groups: bool = False  # allow a shorter last group when group_size does not divide in_features
    unfused: bool = False  # let q/k/v (gate/up) differ: for engines that do not fuse them (vLLM does)
    affine_epochs: int = 10  # affine methods: epochs over the calibration windows per block
    affine_lr: float = 5e-3  # affine methods: learning rate of the transforms (clipping: 2×)
    # affine methods: calibration batches per optimizer step (gradients averaged); under torchrun a
    # step's batches are spread over the processes, so it must be a multiple of their number
    affine_batch: int = 1
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not (0.0 < self.damp_percent < 1.0):
            raise ConfigError(f"damp_percent={self.damp_percent!r} must lie in (0, 1); 0.01 is the usual choice.")
        if self.affine_epochs < 1 or not (0.0 < self.affine_lr < 1.0) or self.affine_batch < 1:
            raise ConfigError(f"affine_epochs={self.affine_epochs!r} and affine_batch={self.affine_batch!r} must be ≥ 1 "
                              f"and affine_lr={self.affine_lr!r} in (0, 1).")
        if self.group_params not in GROUP_PARAMS:
            raise ConfigError(f"group_params={self.group_params!r} must be one of {', '.join(GROUP_PARAMS)}.")
        if self.clip_layer not in CLIP_LAYER:
            raise ConfigError(f"clip_layer={self.clip_layer!r} must be one of {', '.join(CLIP_LAYER)}.")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size!r} must be a positive integer.")
        if self.static_groups and not self.act_order:
            self.static_groups = False  # static groups only matter when columns are permuted
        for pattern, spec in self.overrides.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"override pattern {pattern!r} is not a valid regex: {exc}") from None
            if not isinstance(spec, dict):
                raise ConfigError(f"override {pattern!r} must map to a dict like {{bits: 3}}, got {spec!r}.")
            unknown = set(spec) - {"bits", "group_size", "sym"}
            if unknown:
                raise ConfigError(f"override {pattern!r} has unknown keys {sorted(unknown)}; allowed: bits, group_size, sym.")
            if "bits" in spec:
                check_bits(spec["bits"], f"overrides[{pattern!r}].bits")
            if "group_size" in spec:
                check_group_size(spec["group_size"], f"overrides[{pattern!r}].group_size")

    def group_params_for(self, bits: int) -> str:
        """The static groups' parameter rule at ``bits`` ("auto" resolved)."""
        if self.group_params != "auto":
            return self.group_params
        return "reached" if bits <= REACHED_UP_TO_BITS else "original"

    def clip_layer_for(self, bits: list[int]) -> bool:
        """Whether a decoder layer whose quantized linears are at ``bits`` picks its range search by
        its output ("auto" resolved: any of them at a width of CLIP_LAYER_BITS)."""
        return self.clip_layer == "on" or (self.clip_layer == "auto" and any(b in CLIP_LAYER_BITS for b in bits))

    def spec_for(self, module_name: str) -> ModuleSpec:
        fields = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        for pattern, spec in self.overrides.items():
            if re.search(pattern, module_name):
                fields.update(spec)
        return ModuleSpec(**fields)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["affine_batch"] == 1:  # the default, left out: checkpoints and resume states from before it stay valid
            del out["affine_batch"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown quantization setting(s) {unknown}; known settings: {sorted(known)}.")
        return cls(**data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset into a plain dict (validated by the dataclasses that consume it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: "
                          f"{getattr(exc, 'problem', None) or exc}. Fix the file (see configs/ for examples).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}.")
    return data


# the run's own settings (what to quantize, on what text, where), beside QuantConfig's fields
RUN_KEYS = {"model", "calib", "nsamples", "seqlen", "seed", "dtype", "device", "batch_size", "selection"}
RUN_DEFAULTS = {"model": None, "calib": None, "nsamples": 32, "seqlen": 512, "seed": 0, "dtype": "auto",
                "device": "auto", "batch_size": 8, "selection": {}}  # selection: the mixed search's effort


def parse_overrides(items: list[str] | None) -> dict:
    """``["mlp\\.down_proj=8"]`` -> ``{"mlp\\.down_proj": {"bits": 8}}``."""
    out = {}
    for item in items or []:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.strip().lstrip("-").isdigit():
            raise ConfigError(f"--override {item!r} must look like REGEX=BITS, e.g. 'mlp\\.down_proj=8'.")
        out[pattern] = {"bits": int(bits)}
    return out


def resolve_settings(preset_path: str | None, flags: dict[str, Any], overrides: list[str] | None = None
                     ) -> tuple[dict, QuantConfig, set[str]]:
    """Built-in defaults < the YAML preset < ``flags`` (None: not given). Returns (run settings,
    QuantConfig, the QuantConfig fields the user set, by preset or flag)."""
    preset = load_yaml(preset_path) if preset_path else {}
    quant_keys = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(preset) - quant_keys - RUN_KEYS)
    if unknown:
        raise ConfigError(f"{preset_path}: unknown key(s) {unknown}; allowed: {sorted(quant_keys | RUN_KEYS)}.")
    run = {**RUN_DEFAULTS, **{k: v for k, v in preset.items() if k in RUN_KEYS}}
    quant = {k: v for k, v in preset.items() if k in quant_keys}
    run.update({k: flags[k] for k in RUN_KEYS if flags.get(k) is not None})
    quant.update({k: flags[k] for k in quant_keys - {"overrides"} if flags.get(k) is not None})
    if overrides:
        quant["overrides"] = {**quant.get("overrides", {}), **parse_overrides(overrides)}
    config = QuantConfig.from_dict(quant)
    for k in ("nsamples", "seqlen", "batch_size"):
        if not isinstance(run[k], int) or run[k] < 1:
            raise ConfigError(f"{k}={run[k]!r} must be a positive integer.")
    return run, config, set(quant)
