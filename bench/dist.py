"""Wall time of `hmq quantize` in one process and in several (`torchrun`, gloo on CPUs), side by
side in one run, and the time a rerun saves by resuming after a kill half way.

    python bench/dist.py                               # SmolLM2, GPTQ w4g64, 1 and 2 processes
    python bench/dist.py --processes 1 2 --kill-at 15 --json docs/results/dist.json

Each run is a fresh process (or group); the CPU's threads are split evenly between the processes
(``OMP_NUM_THREADS``), so 1 × 2 threads is compared with 2 × 1 thread. The checkpoints of all runs
are compared tensor for tensor with the first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def hmq(argv: list[str], processes: int, threads: int, env_extra: dict | None = None) -> tuple[int, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env_extra or {})}
    cmd = ([sys.executable, str(WORKER)] if processes == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", str(WORKER)])
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True, cwd=ROOT)
    return done.returncode, time.perf_counter() - t0, done.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads shared by the processes")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--kill-at", type=int, default=15, help="layers saved before the resume run is killed (0: none)")
    p.add_argument("--json", default="docs/results/dist.json")
    args = p.parse_args()
    from quant.export import read_tensors

    work = Path(tempfile.mkdtemp(prefix="hmq-dist-"))
    base = ["quantize", "--bits", str(args.bits), "--group-size", str(args.group_size), "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--no-progress", *(["--model", args.model] if args.model else [])]
    rows, first = [], None
    try:
        for n in args.processes:
            out = work / f"p{n}"
            rc, secs, err = hmq([*base, "--out", str(out)], n, max(1, args.threads // n))
            if rc != 0:
                raise SystemExit(f"{n} processes failed:\n{err[-3000:]}")
            tensors = read_tensors(out)
            first = first or tensors
            same = tensors.keys() == first.keys() and all(torch.equal(tensors[k], first[k]) for k in first)
            rows.append({"run": f"{n} process(es) × {max(1, args.threads // n)} thread(s)", "processes": n,
                         "seconds": secs, "same_checkpoint": same})
            print(f"{rows[-1]['run']:<28} {secs:8.1f} s  same checkpoint as the first: {same}", flush=True)
            common.write_json(args.json, args, {}, rows, quiet=True)
        if args.kill_at:
            out = work / "resumed"
            rc, killed, _ = hmq([*base, "--out", str(out)], 1, args.threads, {"HMQ_TEST_KILL_AFTER": str(args.kill_at)})
            rc, rerun, err = hmq([*base, "--out", str(out)], 1, args.threads)
            if rc != 0:
                raise SystemExit(f"the resumed run failed:\n{err[-3000:]}")
            tensors = read_tensors(out)
            same = all(torch.equal(tensors[k], first[k]) for k in first)
            rows.append({"run": f"killed after {args.kill_at} layers, then rerun", "processes": 1, "seconds": rerun,
                         "killed_after_seconds": killed, "same_checkpoint": same})
            print(f"{rows[-1]['run']:<28} rerun {rerun:8.1f} s (the killed run had run {killed:.1f} s)  same: {same}")
            common.write_json(args.json, args, {}, rows, quiet=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'run':<36} {'s':>8} {'same checkpoint':>16}")
    for r in rows:
        print(f"{r['run']:<36} {r['seconds']:>8.1f} {str(r['same_checkpoint']):>16}")
    common.write_json(args.json, args, {}, rows)


if __name__ == "__main__":
    main()
