"""hmq's GPTQ beside its peers on identical windows: the same calibration windows (hmq's own
``calibration_windows``, one set per seed) go to every tool, and every tool's model is scored by the
same code on the same reporting windows (perplexity, and KL divergence from the fp model).

    python bench/peers.py --schemes w3g64 --seeds 0 1 2 --llmcompressor /tmp/llmc/bin/python
    python bench/peers.py --schemes w4g64 w3g-1s --ref /tmp/gptq-ref --autoround /tmp/ar/bin/python

Peers (each optional, each in its own environment since they pin their own transformers):
- ``--llmcompressor PYTHON``: llm-compressor's ``oneshot`` + ``GPTQModifier`` with its defaults
  (``bench/peer_llmcompressor.py``); its fake-quantized weights are loaded into hmq's fp model.
- ``--autoround PYTHON``: AutoRound with ``--autoround-iters`` iterations (``bench/peer_autoround.py``).
- ``--ref DIR``: the reference GPTQ (an IST-DASLab/gptq checkout; ``bench/peer_gptq.py``), asymmetric
  min/max in natural column order, run in this process.
``--hmq-cli`` adds hmq run as a user runs it: the ``hmq quantize`` command (layers streamed from
disk, the checkpoint exported and loaded back), same windows, its peak RSS recorded.
``--hmq-variants`` adds hmq runs with other solver settings (bench/defaults.py's names) beside the
default; ``rtn`` is round-to-nearest, run once (it reads no calibration windows). The uniform table
of a model: ``--schemes w2g64 w3g64 w4g64 w8g64 --seeds 0 1 2 --hmq-variants rtn``. Writes a table and JSON (default docs/results/peers.json).
"""
from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import common
from defaults import VARIANTS
from quant.model_io import default_model_dir, load_model


def load_weights(base, path: Path):
    """A copy of ``base`` with the linear weights of ``path`` (a peer's fake-quantized model)."""
    model = copy.deepcopy(base)
    state = load_file(str(path))
    missing = [n for n in state if not n.endswith(".weight")]
    if missing or not state:
        raise SystemExit(f"{path}: expected only '<linear>.weight' tensors")
    for name, w in state.items():
        lin = model.get_submodule(name.removesuffix(".weight"))
        if lin.weight.shape != w.shape:
            raise SystemExit(f"{path}: {name} has shape {tuple(w.shape)}, the model {tuple(lin.weight.shape)}")
        lin.weight.data.copy_(w)
    return model


def run_peer(python: str, script: str, folder: Path, wfile: Path, spec, extra: list[str], tmp: Path) -> Path:
    """Run a peer script on the windows saved in ``wfile``; returns its weights file in ``tmp``."""
    out = tmp / f"{Path(script).stem}.safetensors"
    cmd = [python, str(Path(__file__).with_name(script)), "--model", str(folder), "--windows", str(wfile),
           "--bits", str(spec.bits), "--group-size", str(spec.group_size), "--out", str(out), *extra]
    if spec.sym:
        cmd.append("--sym")
    log = tmp / f"{Path(script).stem}.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); its log: {log}\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return out


def run_cli(folder: Path | None, spec, seed: int, nsamples: int, seqlen: int, tmp: Path) -> tuple[Path, float, float]:
    """``hmq quantize`` in its own process, as a user runs it; returns (checkpoint, seconds, peak RSS GB)."""
    import os
    import sys

    out = tmp / f"cli-{common.scheme_label(spec)}-{seed}"
    cmd = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", "quantize", "--bits", str(spec.bits),
           "--group-size", str(spec.group_size), "--seed", str(seed), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
           "--partial-groups", "--no-progress", "--out", str(out), "--overwrite", *(["--sym"] if spec.sym else []),
           *(["--model", str(folder)] if folder else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return out, time.perf_counter() - t0, usage.ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder (default: the offline SmolLM2-135M-Instruct)")
    ap.add_argument("--schemes", nargs="+", default=["w3g64"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="reporting windows")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--hmq-variants", nargs="*", default=[], choices=sorted(VARIANTS),
                    help="hmq solver variants to run beside the default")
    ap.add_argument("--variants-only", action="store_true",
                    help="run the --hmq-variants without hmq's default (e.g. RTN beside an earlier run's default)")
    ap.add_argument("--hmq-cli", action="store_true", help="also run the hmq quantize command (streamed, exported)")
    ap.add_argument("--llmcompressor", metavar="PYTHON", help="python of an environment with llmcompressor")
    ap.add_argument("--autoround", metavar="PYTHON", help="python of an environment with auto-round")
    ap.add_argument("--autoround-iters", type=int, default=20)
    ap.add_argument("--ref", metavar="DIR", help="IST-DASLab/gptq checkout")
    ap.add_argument("--json", default="docs/results/peers.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok, arch = load_model(args.model)
    folder = Path(args.model) if args.model else default_model_dir()
    rep = common.texts(base, tok, "eval", args.windows, args.eval_seqlen, device)
    print(f"fp on reporting text: ppl {rep.fp['ppl']:.3f}", flush=True)
    rows = []

    def record(tool, label, seed, model, seconds, bpw=None, **more):
        res = common.evaluate(model, rep, device)
        rows.append({"tool": tool, "scheme": label, "seed": seed, "seconds": seconds, "bpw": bpw, **res, **more})
        print(f"{label} seed {seed} {tool}: ppl {res['ppl']:.3f} kl {res['kl']:.4f} ({seconds:.0f} s)", flush=True)
        common.write_json(args.json, args, rep.fp, rows, quiet=True)  # a killed run keeps what it finished

    peers = []
    if args.llmcompressor:
        peers.append(("llm-compressor", args.llmcompressor, "peer_llmcompressor.py", []))
    if args.autoround:
        peers.append((f"AutoRound ({args.autoround_iters} it)", args.autoround, "peer_autoround.py",
                      ["--iters", str(args.autoround_iters)]))
    tmp = Path(tempfile.mkdtemp(prefix="hmq-peers-"))
    wfile = tmp / "windows.pt"
    for seed in args.seeds:
        windows = common.calib(tok, args.nsamples, args.seqlen, seed)
        torch.save(windows.clone(), wfile)  # what every peer reads for this seed
        for label in args.schemes:
            spec = common.parse_scheme(label)
            for variant in [*([] if args.variants_only else [None]), *args.hmq_variants]:
                if variant and VARIANTS[variant].get("method") == "rtn" and seed != args.seeds[0]:
                    continue  # RTN reads no calibration windows: every seed gives the same model
                model, report = common.hmq_quantize(base, arch, windows, spec, device, partial_groups=True,
                                                    **({} if variant is None else VARIANTS[variant]))
                record("hmq" if variant is None else f"hmq {variant}", label, seed, model, report.seconds, report.bpw)
                del model
            if args.hmq_cli:
                from quant.loading import load_quantized

                out, seconds, rss = run_cli(Path(args.model) if args.model else None, spec, seed, args.nsamples,
                                            args.seqlen, tmp)
                record("hmq CLI (streamed)", label, seed, load_quantized(out), seconds, rss_gb=rss)
                shutil.rmtree(out)
            for tool, python, script, extra in peers:
                t0 = time.perf_counter()
                out = run_peer(python, script, folder, wfile, spec, extra, tmp)
                model = load_weights(base, out)
                record(tool, label, seed, model, time.perf_counter() - t0)
                del model
            if args.ref:
                if spec.sym:
                    print(f"{label}: the reference GPTQ run here is asymmetric only; skipped", flush=True)
                else:
                    from peer_gptq import reference_gptq

                    model = copy.deepcopy(base)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        reference_gptq(model, arch, windows, spec.bits, spec.group_size, Path(args.ref))
                    record("reference GPTQ", label, seed, model, time.perf_counter() - t0)
                    del model

    shutil.rmtree(tmp)  # only after a whole run: a failed peer's log stays where its error message points
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    print(f"\n{args.model or 'SmolLM2-135M-Instruct'}; calibration {args.nsamples}×{args.seqlen} tokens of the "
          f"calibration text, seeds {args.seeds}, the same windows for every tool; reporting text "
          f"{args.windows}×{args.eval_seqlen} tokens (fp {rep.fp['ppl']:.2f}); mean ± sd over seeds; {common.machine()}")
    print(f"| {'scheme':<8} | {'tool':<22} | {'perplexity':>16} | {'KL (nats)':>18} | {'top-1':>7} | {'s':>6} |")
    print(f"|{'-' * 10}|{'-' * 24}|{'-' * 18}|{'-' * 20}|{'-' * 9}|{'-' * 8}|")
    for label in args.schemes:
        for tool in tools:
            rs = [r for r in rows if r["scheme"] == label and r["tool"] == tool]
            if rs:
                print(f"| {label:<8} | {tool:<22} | {common.fmt([r['ppl'] for r in rs]):>16} | "
                      f"{common.fmt([r['kl'] for r in rs], 4):>18} | {common.mean_sd([r['top1'] for r in rs])[0]:>7.3f} | "
                      f"{common.mean_sd([r['seconds'] for r in rs])[0]:>6.0f} |")
    common.write_json(args.json, args, rep.fp, rows)


if __name__ == "__main__":
    main()
