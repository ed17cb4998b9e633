"""The default mixed recipe (``hmq quantize --budget B``, :mod:`calibration.select`) against uniform
GPTQ at the same real size, on the reporting text, over calibration seeds; and its wall time beside
uniform GPTQ's in the same run.

    python bench/default_mixed.py --budgets w3g64 3.0 --seeds 0 1 2 --json docs/results/select_smollm2.json

A budget is bits per weight, or a uniform scheme's label (its real bits per weight, measured here).
Calibration: the same windows as ``bench/peers.py`` (the calibration part of the default corpus,
per seed); the search scores on the selection part; nothing here is chosen on the reporting part.
Uniform rows other than the one run here come from ``--uniform-json`` (``bench/uniform_table.py``'s
output on the same reporting windows). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from calibration.data import calibration_windows  # noqa: E402
from calibration.select import SelectOptions, SelectRun, select_model  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.model_io import load_model  # noqa: E402


def closed(ppl: float, uniform: float, fp: float) -> float:
    """Share of the uniform model's perplexity gap to fp that ``ppl`` closes."""
    return (uniform - ppl) / (uniform - fp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", nargs="+", default=["w3g64", "3.0"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--uniform", default="w3g64", help="the uniform scheme run here, for time and as a check")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="reporting windows")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--preset", default="configs/mixed-default.yaml", help="the selection: section of this preset")
    ap.add_argument("--uniform-json", default="")
    ap.add_argument("--json", default="docs/results/select.json")
    args = ap.parse_args()

    from quant.config import load_yaml

    opts = SelectOptions(**load_yaml(args.preset).get("selection", {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok, arch = load_model(args.model)
    rep = common.texts(base, tok, "eval", args.windows, args.eval_seqlen, device)
    fp = rep.fp["ppl"]
    print(f"fp on reporting text: ppl {fp:.3f}; preset {args.preset}: {opts}", flush=True)
    rows = []

    def record(row):
        rows.append(row)
        print({k: v for k, v in row.items() if k != "units"}, flush=True)
        common.write_json(args.json, args, rep.fp, rows, quiet=True)

    uspec = common.parse_scheme(args.uniform)
    for seed in args.seeds:
        windows = common.calib(tok, args.nsamples, args.seqlen, seed)
        model, report = common.hmq_quantize(base, arch, windows, uspec, device)
        record({"tool": "hmq uniform", "scheme": args.uniform, "seed": seed, "seconds": report.seconds,
                "bpw": report.bpw, **common.evaluate(model, rep, device)})
        del model
        uniform_bpw = {args.uniform: report.bpw}
        select_windows = calibration_windows(tok, None, opts.samples + opts.confirm, opts.seqlen, seed, "select")
        for b in args.budgets:
            bpw = uniform_bpw[b] if b in uniform_bpw else float(b)
            model = copy.deepcopy(base)
            config = QuantConfig(bits=uspec.bits, group_size=args.group_size)
            t0 = time.perf_counter()
            report, _, rec = select_model(model, arch, config, windows, select_windows, device,
                                          SelectRun(bpw, None), opts, seed=seed, progress=False)
            seconds = time.perf_counter() - t0
            record({"tool": "hmq select", "scheme": f"mixed@{b}", "budget": bpw, "seed": seed, "seconds": seconds,
                    "bpw": report.bpw, **common.evaluate(model, rep, device), "selection_kl": rec["kl"],
                    "written_kl": rec["measured_kl"], "start": rec["start"], "uniform_selection": rec["uniform"],
                    "search": rec["search"], "time": rec["seconds"], "units": rec["units"]})
            del model

    uniform_rows = []
    if Path(args.uniform_json).is_file():
        u = json.loads(Path(args.uniform_json).read_text())
        u = u if isinstance(u, dict) else {"fp": {"ppl": math.nan}, "rows": []}  # a table of rows, not a run
        if math.isclose(u["fp"]["ppl"], fp, rel_tol=1e-6):
            uniform_rows = [r for r in u["rows"] if r.get("tool") == "hmq"]
        elif u["rows"]:
            print(f"not reading {args.uniform_json}: its fp perplexity {u['fp']['ppl']:.3f} says other windows")
    print(f"\n{args.model or 'SmolLM2-135M-Instruct'}; calibration {args.nsamples}×{args.seqlen}, seeds {args.seeds}; "
          f"reporting {args.windows}×{args.eval_seqlen} tokens (fp {fp:.2f}); mean ± sd over seeds; {common.machine()}")
    print(f"| {'configuration':<22} | {'bpw':>6} | {'perplexity':>16} | {'KL (nats)':>18} | {'s':>6} |")
    print(f"|{'-' * 24}|{'-' * 8}|{'-' * 18}|{'-' * 20}|{'-' * 8}|")
    labels = [("hmq uniform", args.uniform)] + [("hmq select", f"mixed@{b}") for b in args.budgets]
    for tool, label in labels:
        rs = [r for r in rows if r["tool"] == tool and r["scheme"] == label]
        print(f"| {label:<22} | {common.mean_sd([r['bpw'] for r in rs])[0]:>6.3f} | {common.fmt([r['ppl'] for r in rs]):>16} | "
              f"{common.fmt([r['kl'] for r in rs], 4):>18} | {common.mean_sd([r['seconds'] for r in rs])[0]:>6.0f} |")
    u_rows = [r for r in rows if r["tool"] == "hmq uniform"]
    for b in args.budgets:
        rs = [r for r in rows if r["scheme"] == f"mixed@{b}"]
        shares = [closed(r["ppl"], u["ppl"], fp) for r, u in zip(rs, u_rows)]
        ratio = [r["seconds"] / u["seconds"] for r, u in zip(rs, u_rows)]
        print(f"mixed@{b}: closes {common.fmt([100 * s for s in shares], 0)}% of uniform {args.uniform}'s gap to fp "
              f"(same seed); wall time {common.fmt(ratio, 2)}× uniform {args.uniform}'s")
    common.write_json(args.json, args, rep.fp, rows + [{"tool": "uniform table", **r} for r in uniform_rows], quiet=False)


if __name__ == "__main__":
    main()
