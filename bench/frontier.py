"""The size/quality frontier of one model: every uniform GPTQ scheme and every default mixed model
measured on its reporting windows, as a table, JSON and a PNG (perplexity and KL against bits per
weight), with each mixed model set against the uniform frontier at its own size.

    python bench/frontier.py docs/results/peers_*.json docs/results/uniform_smollm2_*.json \\
        docs/results/select_smollm2*.json --png docs/results/frontier_smollm2.png

Inputs are ``bench/peers.py`` and ``bench/default_mixed.py`` result files of **one** model on the same
reporting windows (their fp perplexities must agree; the script refuses otherwise). Uniform rows are
hmq's default GPTQ (``hmq``, and ``hmq uniform`` from ``default_mixed.py``); where two files hold the
same (scheme, seed), the later one on the command line wins. The uniform frontier is the set of
uniform schemes no cheaper scheme beats, with log-perplexity (and log-KL) interpolated linearly in bits
per weight between neighbours, as the issue's 2.5 / 3.5 bpw targets read it.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import common

UNIFORM_TOOLS = ("hmq", "hmq uniform")
MIXED_TOOL = "hmq select"


def pareto(points: list[dict], key: str = "ppl") -> list[dict]:
    """The points (each with ``bpw`` and ``key``) that no point of at most their size beats, by size."""
    out = []
    for p in sorted(points, key=lambda p: (p["bpw"], p[key])):
        if not out or p[key] < out[-1][key]:
            out.append(p)
    return out


def on_frontier(frontier: list[dict], bpw: float, key: str = "ppl") -> float:
    """``key`` of the uniform frontier at ``bpw``: its log interpolated linearly in bits per weight
    between the neighbouring frontier points; NaN outside the frontier's span."""
    for lo, hi in zip(frontier, frontier[1:]):
        if lo["bpw"] <= bpw <= hi["bpw"]:
            t = (bpw - lo["bpw"]) / (hi["bpw"] - lo["bpw"])
            return math.exp((1 - t) * math.log(lo[key]) + t * math.log(hi[key]))
    if frontier and math.isclose(bpw, frontier[-1]["bpw"]):
        return frontier[-1][key]
    return math.nan


def closed(value: float, reference: float, fp: float) -> float:
    """Share of ``reference``'s gap to ``fp`` that ``value`` closes (1: all of it; < 0: worse)."""
    return (reference - value) / (reference - fp)


def gather(files: list[str]) -> tuple[float, dict, dict]:
    """fp perplexity, {scheme: {seed: row}} of the uniform rows and the same of the mixed rows."""
    fp, uniform, mixed = None, {}, {}
    for f in files:
        data = json.loads(Path(f).read_text())
        if not isinstance(data, dict) or "rows" not in data:
            raise SystemExit(f"{f}: not a bench/peers.py or bench/default_mixed.py result file")
        here = data["fp"]["ppl"]
        if fp is None:
            fp = here
        elif not math.isclose(here, fp, rel_tol=1e-4):
            raise SystemExit(f"{f}: its fp perplexity {here:.3f} is not {fp:.3f}: another model or other reporting "
                             "windows. Pass one model's files.")
        for r in data["rows"]:
            if r.get("tool") in UNIFORM_TOOLS:
                uniform.setdefault(r["scheme"], {})[r["seed"]] = r
            elif r.get("tool") == MIXED_TOOL:
                mixed.setdefault(r["scheme"], {})[r["seed"]] = r
    if fp is None:
        raise SystemExit("no result files given")
    for rows in uniform.values():  # older files did not record the size: it is the scheme's
        size = next((r["bpw"] for r in rows.values() if r.get("bpw")), None)
        for r in rows.values():
            r["bpw"] = r.get("bpw") or size
    return fp, uniform, mixed


def summarize(by_seed: dict) -> dict:
    rows = list(by_seed.values())
    ppl, kl = [r["ppl"] for r in rows], [r["kl"] for r in rows]
    return {"bpw": rows[0]["bpw"], "seeds": sorted(by_seed), "ppl": common.mean_sd(ppl)[0],
            "ppl_sd": common.mean_sd(ppl)[1], "kl": common.mean_sd(kl)[0], "kl_sd": common.mean_sd(kl)[1],
            "ppl_each": ppl, "kl_each": kl}


def plot(path: str, fp: float, uniform: dict, frontier: list[dict], mixed: dict, title: str, xmax: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "ppl", "perplexity"), (axes[1], "kl", "KL from fp (nats/token)")):
        ax.plot([p["bpw"] for p in frontier], [p[key] for p in frontier], "-", color="tab:orange", alpha=0.6,
                label="uniform frontier")
        for scheme, u in uniform.items():
            hollow = scheme.endswith("s")
            ax.errorbar(u["bpw"], u[key], yerr=u[f"{key}_sd"], fmt="s", color="tab:orange",
                        mfc="none" if hollow else "tab:orange", ms=5, capsize=2)
            ax.annotate(scheme, (u["bpw"], u[key]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        for scheme, m in mixed.items():
            ax.errorbar(m["bpw"], m[key], yerr=m[f"{key}_sd"], fmt="o", color="tab:blue", ms=6, capsize=3,
                        label="hmq default mixed" if scheme == next(iter(mixed)) else None)
        if key == "ppl":
            ax.axhline(fp, color="gray", lw=1, ls=":", label=f"fp ({fp:.2f})")
        ax.set_yscale("log")
        ax.set_xlim(right=xmax)
        ax.set_xlabel("bits per weight (codes + scales + zeros)")
        ax.set_ylabel(f"{label}, reporting text")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    beyond = sorted(s for s, u in uniform.items() if u["bpw"] > xmax)
    fig.suptitle(title + " (hollow: symmetric; bars: sd over seeds" + (f"; beyond {xmax} bpw, off the plot: "
                 + ", ".join(beyond) if beyond else "") + ")", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--title", default="SmolLM2-135M-Instruct")
    ap.add_argument("--png", default="docs/results/frontier.png")
    ap.add_argument("--json", default="docs/results/frontier.json")
    ap.add_argument("--xmax", type=float, default=5.0, help="widest bits per weight plotted")
    args = ap.parse_args()
    for p in (args.png, args.json):
        if not Path(p).parent.is_dir():
            raise SystemExit(f"{p}: its folder does not exist; create it or pick another path")
    fp, uniform_rows, mixed_rows = gather(args.files)
    uniform = {s: summarize(rows) for s, rows in uniform_rows.items() if all(r["bpw"] for r in rows.values())}
    mixed = {s: summarize(rows) for s, rows in mixed_rows.items()}
    frontier = pareto([{"scheme": s, **u} for s, u in uniform.items()])
    kl_frontier = pareto([{"scheme": s, **u} for s, u in uniform.items()], "kl")
    print(f"{args.title}: fp {fp:.2f} on the reporting windows; mean ± sd over seeds")
    print(f"| {'configuration':<16} | {'bpw':>6} | {'seeds':>5} | {'perplexity':>16} | {'KL (nats)':>18} | "
          f"{'frontier ppl':>12} | {'gap closed':>10} |")
    print(f"|{'-' * 18}|{'-' * 8}|{'-' * 7}|{'-' * 18}|{'-' * 20}|{'-' * 14}|{'-' * 12}|")
    out = []
    for kind, table in (("uniform", uniform), ("mixed", mixed)):
        for s, r in sorted(table.items(), key=lambda t: t[1]["bpw"]):
            front = on_frontier(frontier, r["bpw"])
            row = {"kind": kind, "scheme": s, **r, "frontier_ppl": front,
                   "frontier_kl": on_frontier(kl_frontier, r["bpw"], "kl"),
                   "closed": closed(r["ppl"], front, fp) if kind == "mixed" else None}
            out.append(row)
            gap = f"{100 * row['closed']:.1f}%" if row["closed"] is not None and math.isfinite(front) else ""
            print(f"| {s:<16} | {r['bpw']:>6.3f} | {len(r['seeds']):>5} | {common.fmt(r['ppl_each']):>16} | "
                  f"{common.fmt(r['kl_each'], 4):>18} | {front:>12.2f} | {gap:>10} |")
    plot(args.png, fp, uniform, frontier, mixed, args.title, args.xmax)
    Path(args.json).write_text(json.dumps({"fp": fp, "files": args.files, "frontier": [p["scheme"] for p in frontier],
                                           "rows": out}, indent=1))
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
