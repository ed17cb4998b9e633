"""The default mixed recipe (``hmq quantize --budget B``, :mod:`calibration.select`) against uniform
GPTQ at the same real size, on the reporting text, over calibration seeds; and its wall time beside
uniform GPTQ's in the same run.

    python bench/default_mixed.py --budgets w3g64 3.0 --seeds 0 1 2 --json docs/results/select_smollm2.json

A budget is bits per weight, or a uniform scheme's label (its real bits per weight, measured here).
Calibration: the same windows as ``bench/peers.py`` (the calibration part of the default corpus,
per seed); the search scores on the selection part; nothing here is chosen on the reporting part.
Uniform rows other than the one run here come from ``--uniform-json`` (``bench/uniform_table.py``'s
output on the same reporting windows). ``--autoround PYTHON`` adds AutoRound's own mixed precision
(``AutoScheme``, ``bench/peer_autoround.py``) at each budget on the same calibration windows, and
``--peers-only`` runs it without hmq's (beside an earlier run). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from calibration.data import calibration_windows  # noqa: E402
from calibration.search import KLScore  # noqa: E402
from calibration.select import (POOL_SEED, SelectOptions, SelectRun, paired_gain, select_model,  # noqa: E402
                                selection_windows, written_kl)
from quant.config import QuantConfig  # noqa: E402
from quant.model_io import default_model_dir, load_model  # noqa: E402


def closed(ppl: float, uniform: float, fp: float) -> float:
    """Share of the uniform model's perplexity gap to fp that ``ppl`` closes."""
    return (uniform - ppl) / (uniform - fp)


def reporting_gain(row: dict, uniform: dict) -> str:
    """The mixed ``row``'s KL below the uniform row of its seed on the same reporting windows, paired
    per window: "-0.0012 ± 0.0004 (-2.9 se)" (negative: lower than uniform), or "" where either row
    lacks per-window values."""
    if not row.get("window_kl") or not uniform.get("window_kl"):
        return ""
    gain, se, t = paired_gain(uniform["window_kl"], row["window_kl"])
    return f"{-gain:+.4f} ± {se:.4f} ({-t:+.1f} se)"


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
    ap.add_argument("--preset", default=str(Path(__file__).resolve().parents[1] / "configs" / "mixed-default.yaml"),
                    help="the selection: section of this preset (default: the repository's mixed-default.yaml, "
                         "wherever the script is run from)")
    ap.add_argument("--pools", type=int, nargs="+", default=None,
                    help="run each budget with each of these search pools (default: the preset's); 0: fixed windows")
    ap.add_argument("--heldout", type=int, default=32,
                    help="more selection windows, drawn apart, on which every model's KL is also measured: what a "
                         "choice between recipes may be made on (the reporting text may not)")
    ap.add_argument("--autoround", metavar="PYTHON", help="also AutoRound's own mixed precision (AutoScheme over the "
                    "same widths at the same group, on the same calibration windows) at each budget, in this environment")
    ap.add_argument("--autoround-iters", type=int, default=0, help="AutoRound's iterations on AutoScheme's choice "
                    "(0: its round-to-nearest mode; its default 200 takes ~10 min a layer on 2 CPU cores)")
    ap.add_argument("--peers-only", action="store_true",
                    help="run the peers' mixed models (and the uniform row) but not hmq's (e.g. beside an earlier run)")
    ap.add_argument("--autoround-widths", default=SelectRun(None, None).widths,
                    help="AutoScheme's widths (default: those hmq's selection picks among)")
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
        print({k: v for k, v in row.items() if k not in ("units", "window_nll", "window_kl")}, flush=True)
        common.write_json(args.json, args, rep.fp, rows, quiet=True)

    uspec = common.parse_scheme(args.uniform)
    pools = args.pools if args.pools is not None else [opts.pool]
    references = {}

    def held(model, seed: int) -> float:
        """KL on ``--heldout`` selection windows none of the recipe's own draws take (another seed)."""
        if seed not in references:
            ids = calibration_windows(tok, None, args.heldout, opts.seqlen, seed + 2 * POOL_SEED, "select")
            references[seed] = ids, KLScore(base, arch, ids, device, opts.top_k)
        ids, score = references[seed]
        return written_kl(model, arch, ids, device, score)

    for seed in args.seeds:
        windows = common.calib(tok, args.nsamples, args.seqlen, seed)
        model, report = common.hmq_quantize(base, arch, windows, uspec, device)
        record({"tool": "hmq uniform", "scheme": args.uniform, "seed": seed, "seconds": report.seconds,
                "bpw": report.bpw, **common.evaluate(model, rep, device), "heldout_kl": held(model, seed)})
        del model
        uniform_bpw = {args.uniform: report.bpw}
        for b in args.budgets:
            bpw = uniform_bpw[b] if b in uniform_bpw else float(b)
            for pool in [] if args.peers_only else pools:
                arm = dataclasses.replace(opts, pool=pool)
                model = copy.deepcopy(base)
                config = QuantConfig(bits=uspec.bits, group_size=args.group_size)
                t0 = time.perf_counter()
                report, _, rec = select_model(model, arch, config, windows, selection_windows(tok, None, arm, seed),
                                              device, SelectRun(bpw, None), arm, seed=seed, progress=False)
                seconds = time.perf_counter() - t0
                record({"tool": "hmq select", "scheme": f"mixed@{b}", "pool": pool, "budget": bpw, "seed": seed,
                        "seconds": seconds, "bpw": report.bpw, **common.evaluate(model, rep, device),
                        "heldout_kl": held(model, seed), "selection_kl": rec["kl"], "written_kl": rec["measured_kl"],
                        "start": rec["start"], "uniform_selection": rec["uniform"], "search": rec["search"],
                        "time": rec["seconds"], "units": rec["units"]})
                del model
            if args.autoround:
                model, seconds, widths = autoscheme(args, base, tok, windows, bpw)
                record({"tool": "AutoRound AutoScheme", "scheme": f"mixed@{b}", "budget": bpw, "seed": seed,
                        "seconds": seconds, "bpw": real_bpw(base, widths, args.group_size),
                        "iters": args.autoround_iters, **common.evaluate(model, rep, device),
                        "heldout_kl": held(model, seed), "units": widths})
                del model

    uniform_rows = summary(args, rows, pools, fp)
    common.write_json(args.json, args, rep.fp, rows + [{"tool": "uniform table", **r} for r in uniform_rows], quiet=False)


def autoscheme(args, base, tok, windows: torch.Tensor, bpw: float):
    """AutoRound's AutoScheme at ``bpw`` on ``windows``: (model, seconds, {linear: width})."""
    import tempfile

    from peers import load_weights, run_peer
    from safetensors import safe_open

    widths = sorted({int(w) for w in args.autoround_widths.split(",")})
    with tempfile.TemporaryDirectory(prefix="hmq-autoscheme-") as tmp:
        wfile = Path(tmp) / "windows.pt"
        torch.save(windows.clone(), wfile)
        spec = common.parse_scheme(f"w{widths[0]}g{args.group_size}")
        t0 = time.perf_counter()
        out = run_peer(args.autoround, "peer_autoround.py", Path(args.model) if args.model else default_model_dir(),
                       wfile, spec, ["--iters", str(args.autoround_iters), "--avg-bits", f"{bpw:.6f}",
                                     "--widths", ",".join(map(str, widths))], Path(tmp))
        seconds = time.perf_counter() - t0
        with safe_open(str(out), "pt") as f:
            chosen = json.loads(f.metadata()["settings"])["widths"]
        return load_weights(base, out), seconds, chosen


def real_bpw(model, widths: dict[str, int], group_size: int) -> float:
    """Bits per weight of the decoder linears at ``widths`` (linear -> width) as hmq counts them: the codes,
    and per group an fp16 scale and a zero point of the width (16 bits: kept, nothing more)."""
    bits = params = 0
    for name, w in widths.items():
        out, inp = model.get_submodule(name).weight.shape
        groups = out * math.ceil(inp / (group_size if group_size > 0 else inp))
        bits += w * out * inp + (groups * (16 + w) if w < 16 else 0)
        params += out * inp
    return bits / params


def summary(args, rows: list[dict], pools: list[int], fp: float) -> list[dict]:
    """Print the table; returns the uniform table's rows read from ``--uniform-json`` (on the same windows)."""
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
    print(f"| {'configuration':<22} | {'bpw':>6} | {'perplexity':>16} | {'KL (nats)':>18} | {'held-out sel. KL':>18} "
          f"| {'s':>6} |")
    print(f"|{'-' * 24}|{'-' * 8}|{'-' * 18}|{'-' * 20}|{'-' * 20}|{'-' * 8}|")
    groups = [("hmq uniform", args.uniform, None)] + [g for b in args.budgets for g in [
        *[("hmq select", f"mixed@{b}", pool) for pool in pools], ("AutoRound AutoScheme", f"mixed@{b}", None)]]
    u_rows = [r for r in rows if r["tool"] == "hmq uniform"]
    for tool, label, pool in groups:
        rs = [r for r in rows if r["tool"] == tool and r["scheme"] == label and r.get("pool") == pool]
        if not rs:
            continue
        name = label if pool is None or len(pools) == 1 else f"{label} pool {pool}"
        name = f"{name} AutoScheme" if tool.startswith("AutoRound") else name
        print(f"| {name:<22} | {common.mean_sd([r['bpw'] for r in rs])[0]:>6.3f} | {common.fmt([r['ppl'] for r in rs]):>16} | "
              f"{common.fmt([r['kl'] for r in rs], 4):>18} | {common.fmt([r['heldout_kl'] for r in rs], 4):>18} | "
              f"{common.mean_sd([r['seconds'] for r in rs])[0]:>6.0f} |")
        if tool == "hmq select":
            shares = [closed(r["ppl"], u["ppl"], fp) for r, u in zip(rs, u_rows)]
            ratio = [r["seconds"] / u["seconds"] for r, u in zip(rs, u_rows)]
            off = [r["kl"] / r["selection_kl"] - 1 for r in rs]
            paired = [g for g in (reporting_gain(r, u) for r, u in zip(rs, u_rows)) if g]
            if paired:
                print(f"    {name}: reporting KL minus uniform {args.uniform}'s, paired over the {args.windows} "
                      f"windows (mean ± se; > 2 se in either direction is outside the windows' noise), per seed: "
                      + "; ".join(paired))
            print(f"    {name}: closes {common.fmt([100 * s for s in shares], 0)}% of uniform {args.uniform}'s gap to "
                  f"fp (same seed); wall time {common.fmt(ratio, 2)}× uniform {args.uniform}'s; the KL quantize "
                  f"printed (selection text) {common.fmt([r['selection_kl'] for r in rs], 4)}, the reporting KL "
                  f"{common.fmt([100 * o for o in off], 1)}% off it")
    return uniform_rows


if __name__ == "__main__":
    main()
