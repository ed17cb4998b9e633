"""What the uniform-quantization benchmarks share: schemes as short labels, the texts of one run
(calibration windows per seed; selection or reporting windows with the fp model's reference
log-probabilities), hmq's quantization of a model copy, evaluation with KL, and mean ± sd tables."""
from __future__ import annotations

import copy
import json
import math
import platform
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration.data import calibration_windows, eval_tokens
from quant.config import ModuleSpec, QuantConfig
from quant.evaluate import perplexity, reference_logprobs
from quant.pipeline import quantize_model


def parse_scheme(label: str) -> ModuleSpec:
    """``w3g64`` (asymmetric), ``w4g-1s`` (symmetric, one group per output channel) -> ModuleSpec."""
    m = re.fullmatch(r"w(\d+)g(-1|\d+)(s?)", label)
    if not m:
        raise SystemExit(f"scheme {label!r} must look like w3g64, w4g128s (symmetric) or w3g-1 (per channel)")
    return ModuleSpec(int(m.group(1)), int(m.group(2)), bool(m.group(3)))


def scheme_label(spec: ModuleSpec) -> str:
    return f"w{spec.bits}g{spec.group_size}{'s' if spec.sym else ''}"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


@dataclass
class Texts:
    """One run's evaluation text: ``ids`` (n,) and the fp model's log-probabilities on its windows."""

    split: str
    ids: torch.Tensor
    seqlen: int
    windows: int
    fp: dict
    reference: list[torch.Tensor]


def texts(model, tokenizer, split: str, windows: int, seqlen: int, device) -> Texts:
    """Selection (``split='select'``) or reporting (``'eval'``) windows of the default corpus, with
    the fp model's results and reference log-probabilities on them."""
    _, ids = eval_tokens(tokenizer, None, split)
    ref, fp = reference_logprobs(model, ids, seqlen, windows, device, progress=False)
    if fp["windows"] < windows:
        raise SystemExit(f"the {split} text holds only {fp['windows']} windows of {seqlen} tokens")
    return Texts(split, ids, seqlen, windows, fp, ref)


def evaluate(model, t: Texts, device) -> dict:
    res = perplexity(model, t.ids, t.seqlen, t.windows, device, progress=False, reference=t.reference)
    return {k: res[k] for k in ("ppl", "nll", "kl", "kl_p99", "top1", "window_nll", "window_kl")}


def calib(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    return calibration_windows(tokenizer, None, nsamples, seqlen, seed)  # (nsamples, seqlen)


def hmq_quantize(base, arch, windows, spec: ModuleSpec, device, **settings):
    """A quantized copy of ``base`` (hmq GPTQ with ``settings`` over the defaults) and its report."""
    model = copy.deepcopy(base)
    cfg = QuantConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, **settings)
    report = quantize_model(model, arch, windows, cfg, device, progress=False)
    return model, report


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def write_json(path: str, args, fp: dict, rows: list[dict], quiet: bool = False) -> None:
    """The run's settings, machine, fp results and rows as JSON at ``path`` (replaced whole)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(), "settings": vars(args), "fp": fp, "rows": rows}, indent=2))
    tmp.replace(out)
    if not quiet:
        print(f"wrote {out}")
