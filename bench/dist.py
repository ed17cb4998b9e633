"""Wall time of `hmq quantize`, `hmq measure` and `--search` in one process and in several
(`torchrun`, gloo on CPUs), side by side in one run, and the time a rerun saves by resuming after a
kill part way.

    python bench/dist.py                               # SmolLM2, GPTQ w4g64, 1 and 2 processes
    python bench/dist.py --processes 1 2 --kill-at 15 --json docs/results/dist.json
    python bench/dist.py --commands measure search --kill-at 15 --json docs/results/dist_measure.json

Each run is a fresh process (or group); the CPU's threads are split evenly between the processes
(``OMP_NUM_THREADS``), so 1 × 2 threads is compared with 2 × 1 thread. What each run writes (the
checkpoint; the measurement, less its timings; the searched allocation) is compared with the
first run's. ``measure`` runs ``--measure-flags`` (a lighter measurement than the default, the
same for every run); ``search`` refines the first measurement's ``--budget 3.0`` allocation for
``--generations`` generations.
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


def outcome(command: str, out: Path) -> dict:
    """What a run of ``command`` wrote into ``out``, to compare between runs."""
    import json

    from quant.loading import read_tensors

    if command == "measure":
        data = json.loads(out.with_suffix(".sens").read_text())
        data.pop("seconds")
        return {"measurement": data}
    found = {"tensors": read_tensors(out)}
    if command == "search":
        record = json.loads((out / "hmq.json").read_text())["allocation"]
        found["allocation"] = {k: v for k, v in record["units"].items()}
        found["evaluations"] = record["search"]["evaluations"]
    return found


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)) if key == "tensors" else x == y
        for key, x, y in ((key, a[key], b[key]) for key in a))


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
    p.add_argument("--commands", nargs="+", default=["quantize"], choices=["quantize", "measure", "search"],
                   help="search needs measure before it (it refines the first measurement's allocation)")
    p.add_argument("--measure-flags", default="--candidates 2,3,4,8 --probes 8 --single-bits 3 --pair-bits 0 "
                                              "--loss-samples 4 --loss-seqlen 256",
                   help="the measurement every measure run takes")
    p.add_argument("--generations", type=int, default=6, help="--search generations")
    p.add_argument("--json", default="docs/results/dist.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hmq-dist-"))
    model = ["--model", args.model] if args.model else []
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no-progress", *model]
    sens = work / "first.sens"

    def argv(command: str, out: Path) -> list[str]:
        if command == "measure":
            return ["measure", "--group-size", str(args.group_size), *calib, *args.measure_flags.split(),
                    "--out", str(out.with_suffix(".sens"))]
        if command == "search":
            return ["quantize", "--budget", "3.0", "--sensitivity", str(sens), "--search", str(args.generations),
                    *calib, "--out", str(out)]
        return ["quantize", "--bits", str(args.bits), "--group-size", str(args.group_size), *calib, "--out", str(out)]

    rows = []
    try:
        for command in args.commands:
            first = None
            for n in args.processes:
                out = work / f"{command}-p{n}"
                rc, secs, err = hmq(argv(command, out), n, max(1, args.threads // n))
                if rc != 0:
                    raise SystemExit(f"{command} in {n} processes failed:\n{err[-3000:]}")
                found = outcome(command, out)
                if command == "measure" and first is None:
                    shutil.copy(out.with_suffix(".sens"), sens)
                first = first or found
                rows.append({"command": command, "run": f"{n} process(es) × {max(1, args.threads // n)} thread(s)",
                             "processes": n, "seconds": secs, "same_as_first": same(found, first)})
                print(f"{command:<9} {rows[-1]['run']:<28} {secs:8.1f} s  same as the first: {rows[-1]['same_as_first']}",
                      flush=True)
                common.write_json(args.json, args, {}, rows, quiet=True)
            if args.kill_at and command != "search":  # the search's generations are resumed too, but short here
                out = work / f"{command}-resumed"
                _, killed, _ = hmq(argv(command, out), 1, args.threads, {"HMQ_TEST_KILL_AFTER": str(args.kill_at)})
                rc, rerun, err = hmq(argv(command, out), 1, args.threads)
                if rc != 0:
                    raise SystemExit(f"the resumed {command} failed:\n{err[-3000:]}")
                rows.append({"command": command, "run": f"killed after {args.kill_at} layers, then rerun", "processes": 1,
                             "seconds": rerun, "killed_after_seconds": killed,
                             "same_as_first": same(outcome(command, out), first)})
                print(f"{command:<9} {rows[-1]['run']:<28} rerun {rerun:8.1f} s (the killed run had run {killed:.1f} s)"
                      f"  same: {rows[-1]['same_as_first']}", flush=True)
                common.write_json(args.json, args, {}, rows, quiet=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'command':<9} {'run':<36} {'s':>8} {'same as first':>14}")
    for r in rows:
        print(f"{r['command']:<9} {r['run']:<36} {r['seconds']:>8.1f} {str(r['same_as_first']):>14}")
    common.write_json(args.json, args, {}, rows)


if __name__ == "__main__":
    main()
