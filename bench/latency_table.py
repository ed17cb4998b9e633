"""Measure a latency table for ``hmq quantize --budget-latency``: the time of one forward of each
unit shape of a sensitivity file at each candidate width, on this machine's device.

    python bench/latency_table.py --sens m.sens --out latency.json [--tokens 1]

The table maps "OUTxIN" to {candidate label: microseconds}, for a batch of --tokens tokens
(1 = decode). Run it on the GPU you deploy on: the Triton kernels there, PyTorch elsewhere.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibration.sensitivity import Sensitivity
from quant.config import ModuleSpec
from calibration.mixed import shape_key
from quant.qlinear import QuantLinear
from quant.quantizer import rtn_quantize


def time_us(fn, device: torch.device, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=1)
    args = ap.parse_args()
    sens = Sensitivity.load(args.sens)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    table: dict[str, dict[str, float]] = {}
    for u in sens.units:
        key = shape_key(u)
        if key in table:
            continue
        w = torch.randn(u.out_features, u.in_features) * 0.02
        x = torch.randn(args.tokens, u.in_features, device=device, dtype=dtype)
        row = {}
        for k, cand in enumerate(sens.candidates):
            if not sens.cost[sens.units.index(u)][k] < float("inf"):
                continue
            if cand.bits == 16:
                lin = torch.nn.Linear(u.in_features, u.out_features, bias=False).to(device, dtype)
            else:
                qw = rtn_quantize(w, ModuleSpec(cand.bits, cand.group_size))
                lin = QuantLinear.from_quantized(qw, None, dtype=dtype).to(device)
            row[cand.label] = time_us(lambda: lin(x), device)
        table[key] = row
        print(key, {k: round(v, 1) for k, v in row.items()}, flush=True)
    Path(args.out).write_text(json.dumps(table, indent=1))
    print(f"wrote {args.out} ({device}, {args.tokens} token(s) per forward, microseconds)")


if __name__ == "__main__":
    main()
