"""The uniform table (fp, RTN and hmq's default GPTQ at each scheme, mean ± sd over calibration seeds)
gathered from ``bench/peers.py`` result files, one block per model.

    python bench/uniform_table.py docs/results/peers_*.json docs/results/uniform_*.json

Each file holds one model's rows on that model's reporting windows (``peers.py`` scores every tool
on the same ones). Where two files hold the same (model, scheme, tool, seed), the one later in the
argument list wins (the glob above sorts them by name). ``--peer-rows`` files give only their peers'
rows (the llm-compressor side of a grid whose hmq rows an older default took):

    python bench/uniform_table.py --peers docs/results/peers_wt_*.json --peer-rows docs/results/peers_grid_*.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
from calibration.select import paired_gain

TOOLS = {"hmq rtn": "RTN", "hmq": "GPTQ (hmq default)"}
PEERS = {"hmq": "hmq default", "llm-compressor": "llm-compressor"}


def model_of(data: dict) -> str:
    """The model a result file was taken on (older files keep only the command line)."""
    if "settings" in data:
        spec = data["settings"].get("model")
    else:
        words = data.get("command", "").split()
        spec = words[words.index("--model") + 1] if "--model" in words else None
    return Path(spec).name if spec else "SmolLM2-135M-Instruct"


def verdict(model: str, scheme: str, rows: dict) -> str:
    """'' or a line saying which tool is lower at ``scheme`` on the seeds both ran (mean perplexity, KL)."""
    got = {t: {seed: r for (m, s, tool, seed), r in rows.items() if (m, s, tool) == (model, scheme, t)} for t in PEERS}
    seeds = sorted(set(got["hmq"]) & set(got["llm-compressor"]))
    if not seeds:
        return ""
    h, lc = ([got[t][s] for s in seeds] for t in PEERS)
    ppl = [common.mean_sd([r["ppl"] for r in rs])[0] for rs in (h, lc)]
    kl = [common.mean_sd([r["kl"] for r in rs])[0] for rs in (h, lc)]
    lower = "hmq" if ppl[0] <= ppl[1] and kl[0] <= kl[1] else "llm-compressor" if ppl[1] < ppl[0] and kl[1] < kl[0] \
        else "split"
    line = (f"- {scheme}, seeds {','.join(map(str, seeds))}: lower: **{lower}** (perplexity {ppl[0]:.2f} against "
            f"{ppl[1]:.2f}, KL {kl[0]:.4f} against {kl[1]:.4f})")
    tests = {key: paired(h, lc, key) for key in ("window_nll", "window_kl")}
    if None in tests.values():
        return line
    (dn, sn, tn), (dk, sk, tk) = tests.values()
    noise = " — hmq's higher side is inside the noise (under 2 se)" if lower != "hmq" and all(
        t < 2 for t in (tn, tk) if t > 0) else ""
    return (line + f"; paired over every window of these seeds, hmq − llm-compressor: log-perplexity "
            f"{dn:+.5f} ± {sn:.5f} ({tn:+.1f} se), KL {dk:+.5f} ± {sk:.5f} ({tk:+.1f} se){noise}")


def paired(hmq: list[dict], peer: list[dict], key: str) -> tuple[float, float, float] | None:
    """hmq's per-window ``key`` minus the peer's, paired over every window of every seed (rows in the
    same seed order): the mean difference (< 0: hmq lower), its standard error and their ratio; None
    where a row kept no per-window values (older runs). Each window's NLL is its tokens' mean, and every
    window has as many, so the mean NLL difference is the difference in log-perplexity."""
    if not all(r.get(key) for r in [*hmq, *peer]):
        return None
    a, b = ([v for r in rows for v in r[key]] for rows in (hmq, peer))
    if len(a) != len(b):
        return None
    gain, se, t = paired_gain(a, b)  # a - b: hmq minus the peer
    return gain, se, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--schemes", nargs="+", default=["w2g64", "w3g64", "w4g64", "w8g64"])
    ap.add_argument("--peer-rows", nargs="+", type=Path, default=[],
                    help="files whose peers' rows alone are read (hmq's there were taken with older defaults)")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--peers", action="store_true",
                    help="hmq's default beside llm-compressor instead of RTN, with which is lower at each scheme")
    args = ap.parse_args()
    tools = PEERS if args.peers else TOOLS
    rows: dict[tuple, dict] = {}
    fp: dict[str, float] = {}
    for path in [*args.peer_rows, *args.files]:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            continue  # not a peers.py result (this script's own --json output, say)
        model = model_of(data)
        model = model.split("-q4_k_m")[0]  # the converted Gemma folder's cache key is not part of its name
        fp[model] = data["fp"]["ppl"]
        peers_only = path in args.peer_rows
        for r in data["rows"]:
            if r["tool"] in tools and r["scheme"] in args.schemes and not (peers_only and r["tool"].startswith("hmq")):
                rows[(model, r["scheme"], r["tool"], r["seed"])] = r
    table = []
    for model in fp:
        print(f"\n{model}: fp perplexity {fp[model]:.2f} on its reporting windows\n")
        print("| scheme | method | bpw | perplexity | KL (nats) | top-1 | seeds |")
        print("|---|---|---|---|---|---|---|")
        verdicts = [v for v in (verdict(model, scheme, rows) for scheme in args.schemes) if v] if args.peers else []
        for scheme in args.schemes:
            for tool, label in tools.items():
                rs = [r for (m, s, t, _), r in sorted(rows.items()) if (m, s, t) == (model, scheme, tool)]
                if not rs:
                    continue
                bpw = next((r["bpw"] for (m, sc, _, _), r in rows.items() if (m, sc) == (model, scheme) and r.get("bpw")),
                           float("nan"))
                seeds = sorted(r["seed"] for r in rs)
                print(f"| {scheme} | {label} | {bpw:.3f} | {common.fmt([r['ppl'] for r in rs])} | "
                      f"{common.fmt([r['kl'] for r in rs], 4)} | {common.mean_sd([r.get('top1') for r in rs])[0]:.3f} | "
                      f"{','.join(map(str, seeds)) if tool != 'hmq rtn' else '– (no calibration)'} |")
                table.append({"model": model, "scheme": scheme, "method": label, "bpw": bpw, "seeds": seeds,
                              "ppl": [r["ppl"] for r in rs], "kl": [r["kl"] for r in rs], "fp_ppl": fp[model]})
        if verdicts:
            print("\nOn the seeds both ran, mean over them (lower on both counts, or split):\n" + "\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
