"""Packed-int matmul kernels vs fp16 ``torch.matmul`` on a CUDA GPU, against the memory roofline.

    python bench/kernel_speed.py --model random-1b   # all shapes, batches 1/4/16/64/512, widths 2/3/4/8
    python bench/kernel_speed.py --peak-gbs 3350 --json bench/results/kernels.json

For each (shape, batch, width): kernel time (median under a CUDA graph, over enough copies of the
weight that each call streams 200 MB, so neither side is served from the 50 MB L2), bytes moved
(packed weight + scales + zeros + activations in/out), achieved GB/s, % of the peak memory
bandwidth, and speedup over fp16 ``torch.matmul`` measured in the same run. Then end-to-end
greedy decode tokens/s of a quantized model vs its fp16 original (``--model``; default the
offline SmolLM2-135M).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

L2_STREAM = 200 * 2**20  # bytes of weights each timed call reads (the H100's L2 is 50 MB)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out_features, in_features)


def bench_ms(fn) -> float:
    """Median kernel time under a CUDA graph (what a serving engine replays), so the Python launch
    cost of either side does not enter the comparison."""
    import triton.testing as tt

    fn()
    return tt.do_bench_cudagraph(fn, rep=100)


def kernel_rows(args) -> list[dict]:
    from quant.config import ModuleSpec
    from quant.kernels import triton_qmm
    from quant.qlinear import QuantLinear
    from quant.quantizer import rtn_quantize

    rows = []
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02
        for bits in args.bits:
            layer = QuantLinear.from_quantized(rtn_quantize(w.float(), ModuleSpec(bits, args.group_size)),
                                               dtype=torch.float16).cuda()
            wbytes = layer.storage_bytes
            # as many copies as stream 4× the L2 cache per call (as a model's layers do), for both sides
            copies_q = [layer] + [copy.deepcopy(layer) for _ in range(min(63, L2_STREAM // wbytes))]
            copies_fp = [w] + [w.clone() for _ in range(min(63, L2_STREAM // (2 * w.numel())))]
            for c in copies_q:
                triton_qmm.runtime_layout(c)
            for batch in args.batches:
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                t_fp = bench_ms(lambda: [torch.matmul(x, c.T) for c in copies_fp]) / len(copies_fp)

                def t_hmq() -> float:
                    return bench_ms(lambda: [triton_qmm.qmatmul(x, c) for c in copies_q]) / len(copies_q)

                # batches above the GEMV: the tiled GEMM kernel and dequantize + cuBLAS, both timed
                t_gemm = t_deq = None
                if batch > triton_qmm.GEMV_MAX_ROWS:
                    default = triton_qmm.DEQUANT_MIN_ROWS
                    triton_qmm.DEQUANT_MIN_ROWS = 1 << 30
                    t_gemm = t_hmq()
                    triton_qmm.DEQUANT_MIN_ROWS = 0
                    t_deq = t_hmq()
                    triton_qmm.DEQUANT_MIN_ROWS = default
                    t_q = t_deq if batch >= default else t_gemm
                else:
                    t_q = t_hmq()
                moved = wbytes + 2 * batch * (in_f + out_f)
                gbs = moved / t_q / 1e6
                rows.append({"shape": f"{out_f}x{in_f}", "bits": bits, "batch": batch, "ms": t_q, "fp16_ms": t_fp,
                             "gemm_kernel_ms": t_gemm, "dequant_cublas_ms": t_deq,
                             "GB/s": gbs, "roofline_%": 100 * gbs / args.peak_gbs, "speedup": t_fp / t_q})
                r = rows[-1]
                extra = "" if t_gemm is None else f" (gemm {t_gemm * 1e3:7.1f}, dequant+cuBLAS {t_deq * 1e3:7.1f})"
                print(f"{r['shape']:>11} w{bits} b{batch:<4} {t_q * 1e3:8.1f} µs{extra}  fp16 {t_fp * 1e3:8.1f} µs  "
                      f"{gbs:7.0f} GB/s  {r['roofline_%']:5.1f}%  ×{r['speedup']:.2f}", flush=True)
    return rows


RANDOM_MODELS = {  # Llama-shaped, random weights: decode speed does not depend on what the weights learned
    "random-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4),
    "random-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8),
}


def _decode_model(spec):
    from quant.arch import get_arch
    from quant.model_io import load_model

    if spec in RANDOM_MODELS:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **RANDOM_MODELS[spec])
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.float16).eval()
        return model, None, get_arch(model.config.model_type)
    return load_model(spec, torch.float16)


def decode_rows(args) -> list[dict]:
    from quant.config import QuantConfig
    from quant.pipeline import quantize_model

    model, tokenizer, arch = _decode_model(args.model)
    fp = copy.deepcopy(model).cuda()
    # RTN needs no calibration activations: the windows are never read
    report = quantize_model(model, arch, torch.zeros(1, 8, dtype=torch.long), QuantConfig(method="rtn", bits=args.decode_bits,
                            group_size=args.decode_group_size), torch.device("cuda"), progress=False)
    model.cuda()
    out = []
    prompt = (tokenizer("The compiler", return_tensors="pt").input_ids if tokenizer is not None
              else torch.tensor([[1, 450, 6516]])).cuda()
    for name, m in (("fp16", fp), (f"hmq w{args.decode_bits}g{args.decode_group_size}", model)):
        m.config.use_cache = True
        m.generate(prompt, max_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        torch.cuda.synchronize()
        out.append({"model": name, "tokens_per_s": args.tokens / (time.perf_counter() - t0)})
        print(f"decode {args.model or 'SmolLM2-135M'} {name}: {out[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    out[-1]["linear_bytes"] = sum(r.bytes for r in report.modules)
    out[0]["linear_bytes"] = sum(2 * r.params for r in report.modules)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 128, 512, 2048])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--peak-gbs", type=float, default=3350.0, help="device memory bandwidth (H100 SXM: 3350)")
    ap.add_argument("--model", default=None, help=f"decode model: a hub id or folder, or one of {sorted(RANDOM_MODELS)} "
                    "(random weights, no download); default the offline SmolLM2-135M")
    ap.add_argument("--decode-bits", type=int, default=4)
    ap.add_argument("--decode-group-size", type=int, default=128)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default="bench/results/kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py needs a CUDA GPU; the kernels' correctness tests run anywhere (pytest tests/test_kernels.py).")
    rows = kernel_rows(args)
    decode = [] if args.skip_decode else decode_rows(args)
    print(f"\n{torch.cuda.get_device_name()}, peak {args.peak_gbs:.0f} GB/s, group {args.group_size}")
    print("| shape | bits | batch | µs | fp16 µs | GB/s | % roofline | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['bits']} | {r['batch']} | {r['ms'] * 1e3:.1f} | {r['fp16_ms'] * 1e3:.1f} | "
              f"{r['GB/s']:.0f} | {r['roofline_%']:.1f} | {r['speedup']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "settings": vars(args),
                                           "kernels": rows, "decode": decode}, indent=2))


if __name__ == "__main__":
    main()
