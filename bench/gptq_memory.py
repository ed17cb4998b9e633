"""Peak memory one GPTQ solve adds, as a multiple of its Hessian's size: a random (out, in) weight
and a Hessian from random inputs, solved with the default act-order and static groups, in a fresh
process per run; ``--before`` runs the same from another checkout, side by side.

    python bench/gptq_memory.py --shape 1024 8192 --before /tmp/old-checkout

At Llama-3-70B's ``down_proj`` (28,672 inputs) the fp32 Hessian alone is 3.3 GB, so this multiple
decides whether a 70B layer fits a 24 GB machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, torch
from quant.config import ModuleSpec
from quant.gptq import gptq_quantize
out, inn = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
W = torch.randn(out, inn, dtype=torch.bfloat16)
X = torch.randn(1024, inn)
H = 2 * X.T @ X / 1024
del X
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gptq_quantize(W, H, ModuleSpec(bits=4, group_size=128, sym=False), act_order=True, static_groups=True)
rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"rise_gb": rise / 1e9, "hessian_gb": H.numel() * 4 / 1e9}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=[1024, 8192], metavar=("OUT", "IN"))
    p.add_argument("--before", type=Path, help="another hmq checkout, run side by side")
    p.add_argument("--json", default="docs/results/gptq_memory.json")
    args = p.parse_args()
    sources = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    args.before = str(args.before) if args.before else None
    rows = []
    for label, src in sources.items():
        done = subprocess.run([sys.executable, "-c", CHILD, *map(str, args.shape)], cwd=src, capture_output=True,
                              text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"code": label, "shape": args.shape, **r, "multiple": r["rise_gb"] / r["hessian_gb"]})
    print(f"{'code':<8} {'shape':<14} {'H GB':>7} {'peak rise GB':>13} {'× H':>6}")
    for r in rows:
        print(f"{r['code']:<8} {str(tuple(r['shape'])):<14} {r['hessian_gb']:>7.3f} {r['rise_gb']:>13.3f} {r['multiple']:>6.2f}")
    common.write_json(args.json, args, {}, rows)


if __name__ == "__main__":
    main()
