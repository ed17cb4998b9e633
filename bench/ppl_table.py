"""Perplexity and quantization time of fp vs RTN vs GPTQ at 2/3/4/8 bits on the offline default model.

    python bench/ppl_table.py                       # SmolLM2-135M-Instruct, g128 asym, FOLDOC
    python bench/ppl_table.py --bits 3 4 --windows 8 --json bench/results/ppl.json
    python bench/ppl_table.py --bits 2 3 4 --methods rtn gptq affine affine+gptq --json bench/results/affine.json

Calibration: FOLDOC's calibration part (32 × 512 tokens, seed 0); evaluation: FOLDOC's held-out
part, non-overlapping 512-token windows. SmolLM2's 576-wide inputs are not a multiple of 128, so
g128 uses a shorter last group there (``partial_groups``), as GPTQ's reference code does.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch

from calibration.data import calibration_windows, eval_tokens
from quant.config import QuantConfig
from quant.evaluate import perplexity
from quant.model_io import load_model
from quant.pipeline import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the offline SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows (default 32)")
    ap.add_argument("--affine-epochs", type=int, default=10, help="epochs per block for the affine methods")
    ap.add_argument("--affine-lr", type=float, default=5e-3)
    ap.add_argument("--json", default="bench/results/ppl_table.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer, arch = load_model(args.model)
    calib = calibration_windows(tokenizer, None, args.nsamples, args.seqlen, 0)
    _, ids = eval_tokens(tokenizer)
    rows = []

    def evaluate(model):
        return perplexity(model, ids, args.eval_seqlen, args.windows, device, progress=False)

    fp = evaluate(base)
    base.to("cpu")
    rows.append({"method": "fp", "bits": 16, "ppl": fp["ppl"], "quant_seconds": 0.0, "bpw": 16.0})
    print(f"fp: ppl {fp['ppl']:.3f}", flush=True)
    for bits in args.bits:
        for method in args.methods:
            model = copy.deepcopy(base)
            cfg = QuantConfig(method=method, bits=bits, group_size=args.group_size, partial_groups=True,
                              affine_epochs=args.affine_epochs, affine_lr=args.affine_lr)
            report = quantize_model(model, arch, calib, cfg, device, progress=False)
            res = evaluate(model)
            rows.append({"method": method, "bits": bits, "ppl": res["ppl"], "quant_seconds": report.seconds,
                         "bpw": report.bpw, **({"affine_loss_first_last": [[v[0], v[-1]] for v in report.affine_loss]}
                                               if report.affine_loss else {}),
                         **({"learned_grid_rows": sum(report.learned_grid_rows) / len(report.learned_grid_rows)}
                            if report.learned_grid_rows else {})})
            print(f"{method} w{bits}: ppl {res['ppl']:.3f} in {report.seconds:.1f} s", flush=True)
            del model

    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads")
    print(f"\nmodel {args.model or 'SmolLM2-135M-Instruct'}, g{args.group_size} asym, calib FOLDOC "
          f"{args.nsamples}×{args.seqlen}, eval FOLDOC held-out {fp['windows']}×{args.eval_seqlen} tokens, {machine}")
    print(f"| {'method':<11} | {'bits':>4} | {'bpw':>6} | {'ppl':>9} | {'quant s':>8} |")
    print(f"|{'-' * 13}|{'-' * 6}|{'-' * 8}|{'-' * 11}|{'-' * 10}|")
    for r in rows:
        print(f"| {r['method']:<11} | {r['bits']:>4} | {r['bpw']:>6.3f} | {r['ppl']:>9.3f} | {r['quant_seconds']:>8.1f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": vars(args), "eval_tokens": fp["tokens"], "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
