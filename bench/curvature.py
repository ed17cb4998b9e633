"""Layer-by-layer Hutchinson on SmolLM2 (streamed from its shards), side by side in one run: the
probes of a sweep batched with ``vmap`` (``--per-sweep``, default 4) against one probe per sweep, with
the same probes, so the estimates are equal and only the time and peak memory differ.

    python bench/curvature.py --probes 4 --json docs/results/curvature.json
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--per-sweep", type=int, default=4)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--json", default="docs/results/curvature.json")
    args = p.parse_args()
    from calibration.curvature import hutchinson_traces
    from calibration.data import calibration_windows
    from calibration.units import build_units
    from quant.model_io import load_model

    model, tok, arch = load_model(None, stream=True)
    ids = calibration_windows(tok, "foldoc", args.windows, args.seqlen, 1)
    names = [f"{m}.weight" for u in build_units(model, arch) for m in u.members]
    rows = []
    for per in (args.per_sweep, 1):
        t0 = time.perf_counter()
        est = hutchinson_traces(model, arch, names, ids, torch.device("cpu"), tol=0.0, max_probes=args.probes,
                                probes_per_sweep=per, progress=False)
        rows.append({"probes_per_sweep": per, "seconds": time.perf_counter() - t0, "probes": est.probes,
                     "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "mean": est.mean})
        print(f"{per} per sweep: {rows[-1]['seconds']:.1f} s for {est.probes} probes", flush=True)
    same = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(rows[0]["mean"], rows[1]["mean"]))
    print()
    print(f"{'probes per sweep':>16} {'seconds':>8} {'s/probe':>8}")
    for r in rows:
        print(f"{r['probes_per_sweep']:>16} {r['seconds']:>8.1f} {r['seconds'] / r['probes']:>8.1f}")
    print(f"ratio {rows[1]['seconds'] / rows[0]['seconds']:.2f}x; largest relative difference of the estimates {same:.1e}")
    for r in rows:
        r.pop("mean")
    common.write_json(args.json, args, {"max_rel_diff": same}, rows)


if __name__ == "__main__":
    main()
