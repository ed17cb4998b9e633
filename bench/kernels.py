"""Packed-int matmul kernels vs fp16 ``torch.matmul`` on a CUDA GPU, against the memory roofline.

    python bench/kernels.py                     # all shapes, batches 1/4/16/64, widths 2/3/4/8
    python bench/kernels.py --peak-gbs 3350 --json bench/results/kernels.json

For each (shape, batch, width): kernel time (median, L2 flushed between runs by triton's
``do_bench``; CUDA graphs via ``do_bench_cudagraph`` for launches under 50 µs), bytes moved
(packed weight + scales + zeros + activations in/out), achieved GB/s, % of the peak memory
bandwidth, and speedup over fp16 ``torch.matmul`` measured in the same run. Then end-to-end
greedy decode tokens/s of a quantized model vs its fp16 original (``--model``; default the
offline SmolLM2-135M).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (out_features, in_features)


def bench_ms(fn) -> float:
    import triton.testing as tt

    ms = tt.do_bench(fn, warmup=25, rep=100)
    if ms < 0.05:  # tiny launches: launch overhead dominates without graphs
        ms = min(ms, tt.do_bench_cudagraph(fn, rep=100))
    return ms


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
            triton_qmm.runtime_layout(layer)
            wbytes = layer.storage_bytes
            for batch in args.batches:
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                t_q = bench_ms(lambda: triton_qmm.qmatmul(x, layer))
                t_fp = bench_ms(lambda: torch.matmul(x, w.T))
                moved = wbytes + 2 * batch * (in_f + out_f)
                gbs = moved / t_q / 1e6
                rows.append({"shape": f"{out_f}x{in_f}", "bits": bits, "batch": batch, "ms": t_q, "fp16_ms": t_fp,
                             "GB/s": gbs, "roofline_%": 100 * gbs / args.peak_gbs, "speedup": t_fp / t_q})
                r = rows[-1]
                print(f"{r['shape']:>11} w{bits} b{batch:<3} {t_q * 1e3:8.1f} µs  fp16 {t_fp * 1e3:8.1f} µs  "
                      f"{gbs:7.0f} GB/s  {r['roofline_%']:5.1f}%  ×{r['speedup']:.2f}", flush=True)
    return rows


def decode_rows(args) -> list[dict]:
    import copy

    from calibration.data import calibration_windows
    from quant.config import QuantConfig
    from quant.model_io import load_model
    from quant.pipeline import quantize_model

    model, tokenizer, arch = load_model(args.model, torch.float16)
    fp = copy.deepcopy(model).cuda()
    quantize_model(model, arch, calibration_windows(tokenizer, None, 8, 256, 0),
                   QuantConfig(method="rtn", bits=4, group_size=args.decode_group_size), torch.device("cuda"),
                   progress=False)
    model.cuda()
    out = []
    prompt = tokenizer("The compiler", return_tensors="pt").input_ids.cuda()
    for name, m in (("fp16", fp), ("hmq w4", model)):
        m.config.use_cache = True
        m.generate(prompt, max_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        torch.cuda.synchronize()
        out.append({"model": name, "tokens_per_s": args.tokens / (time.perf_counter() - t0)})
        print(f"decode {name}: {out[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--peak-gbs", type=float, default=3350.0, help="device memory bandwidth (H100 SXM: 3350)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--decode-group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", default="bench/results/kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU; the kernels' correctness tests run anywhere (pytest tests/test_kernels.py).")
    rows = kernel_rows(args)
    decode = decode_rows(args)
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
