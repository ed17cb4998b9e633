"""Peak memory and wall time of hmq's commands on random-init Llama-shaped models built from configs
and saved as sharded safetensors: a sweep of depth (4/8/16/32 layers at hidden 1024) and of width
(hidden 1024/2048/4096 at 4 layers). Each command runs in its own process; its peak RSS comes from
the kernel (``wait4``), so the benchmark's own memory is not counted.

    python bench/memory.py                                # the table and docs/results/memory.json
    python bench/memory.py --before /tmp/old-checkout     # the same commands from another checkout, side by side

Targets (issue 22): memory flat in depth (the 32-layer peak ≤ 1.25× the 4-layer peak) for every command.
A Mixtral-shaped model with 8 experts (``moe8-d4-h1024``) is set beside the dense model of its active
size (``d4-h1024``): ``--shapes d4-h1024 moe8-d4-h1024 --json docs/results/memory_moe.json``.
``select`` is ``quantize --budget 3.0`` as a user runs it (the KL-scored default recipe), with its
default windows and one generation; ``budget``/``search`` are the measurement recipe (``--recipe measure``):
``--shapes d4-h1024 d32-h1024 --commands select --json docs/results/memory_select.json``.
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
SHAPES = {  # name -> (layers, hidden, intermediate, heads, kv heads[, vocabulary]); Llama proportions
    "d4-h1024": (4, 1024, 2816, 16, 4), "d8-h1024": (8, 1024, 2816, 16, 4), "d16-h1024": (16, 1024, 2816, 16, 4),
    "d32-h1024": (32, 1024, 2816, 16, 4), "d4-h2048": (4, 2048, 5632, 16, 4), "d4-h4096": (4, 4096, 11008, 32, 8),
    "llama3-70b-2layers": (2, 8192, 28672, 64, 8, 128256),  # two decoder layers of Llama-3-70B's shape
}
# Mixtral-shaped: (layers, hidden, expert intermediate, heads, kv heads, experts, experts per token).
# moe8-d4-h1024 runs 2 of 8 experts of 1408 per token: the active size of d4-h1024 (intermediate 2816).
MOE_SHAPES = {"moe8-d4-h1024": (4, 1024, 1408, 16, 4, 8, 2)}
SHAPES |= MOE_SHAPES


def build(folder: Path, shape: tuple, tokenizer_dir: Path) -> int:
    """A random Llama of ``shape`` in fp16, sharded, with SmolLM2's tokenizer; returns its parameter count."""
    import transformers

    layers, hidden, inter, heads, kv = shape[:5]
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    common_cfg = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=False)
    if shape in MOE_SHAPES.values():
        cfg = transformers.MixtralConfig(vocab_size=len(tok), num_local_experts=shape[5], num_experts_per_tok=shape[6],
                                         **common_cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=shape[5] if len(shape) > 5 else len(tok), **common_cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="2GB" if hidden > 4096 else "200MB")
    tok.save_pretrained(folder)
    del model
    from quant.stream import trim_heap

    trim_heap()  # the next command's process needs the memory this one freed
    return n


def run(argv: list[str], src: Path) -> dict:
    """Run ``hmq argv`` with the sources in ``src``; its peak RSS (GB), wall time and exit status."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", *argv],
                            cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return {"rss_gb": usage.ru_maxrss / 1e6, "seconds": time.perf_counter() - t0, "rc": proc.returncode}


def commands(model: Path, work: Path, args) -> dict[str, list[str]]:
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no-progress", "--dtype", args.dtype]
    return {
        "quantize": ["quantize", "--model", str(model), "--bits", "4", "--group-size", "128", "--method", args.method, *calib,
                     *args.quantize_flags.split(), "--out", str(work / "q"), "--overwrite"],
        "eval": ["eval", "--model", str(model), "--seqlen", str(args.seqlen), "--max-windows", str(args.windows),
                 "--no-progress", "--dtype", args.dtype],
        # the measurement and a mixed run with a measurement; --measure-flags (the same at every depth)
        # keeps random models' runs short: memory, not the measurement's cost, is what this compares
        "measure": ["measure", "--model", str(model), *calib, *args.measure_flags.split(), "--out", str(work / "m.sens")],
        "budget": ["quantize", "--model", str(model), "--budget", "3.0", "--recipe", "measure", *calib, *args.measure_flags.split(),
                   "--out", str(work / "b"), "--overwrite", "--restart"],
        # a few generations of the search on top: its candidate database and stitched-model losses
        "search": ["quantize", "--model", str(model), "--budget", "3.0", "--recipe", "measure", "--search", "2", "--search-samples", "2",
                   "--search-seqlen", "256", "--search-offspring", "2", *calib, *args.measure_flags.split(),
                   "--out", str(work / "s"), "--overwrite", "--restart"],
        # the default recipe (KL-scored selection) with its default windows, fewer generations
        "select": ["quantize", "--model", str(model), "--budget", "3.0", *calib, *args.select_flags.split(),
                   "--out", str(work / "k"), "--overwrite", "--restart"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4, help="evaluation windows")
    p.add_argument("--method", default="gptq", help="hmq's --method for quantize")
    p.add_argument("--dtype", default="auto", help="hmq's --dtype (auto: float32 on a CPU)")
    p.add_argument("--commands", nargs="+", default=["quantize", "eval"], choices=["quantize", "eval", "measure", "budget", "search", "select"])
    p.add_argument("--quantize-flags", default="", help="extra flags of the quantize command (e.g. --no-clip)")
    p.add_argument("--measure-flags", default="--candidates 2,4 --probes 2 --single-bits 2 --pair-bits 2 --loss-samples 2",
                   help="flags of the measure and budget commands (default: a light measurement)")
    p.add_argument("--select-flags", default="--search 1 --search-offspring 2",
                   help="flags of the select command, the default recipe (default: its selection windows, one generation)")
    p.add_argument("--before", type=Path, help="another hmq checkout to run the same commands from, side by side")
    p.add_argument("--codes", nargs="+", default=["now", "before"], choices=["now", "before"],
                   help="which code runs (before: only with --before)")
    p.add_argument("--before-shapes", nargs="+", choices=list(SHAPES), help="the shapes --before runs (default: all)")
    p.add_argument("--json", default="docs/results/memory.json")
    args = p.parse_args()
    from quant.model_io import default_model_dir

    tokenizer_dir = default_model_dir()
    sources = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    args.before = str(args.before) if args.before else None  # as JSON
    rows = []
    work = Path(tempfile.mkdtemp(prefix="hmq-memory-"))
    try:
        for name in args.shapes:
            folder = work / name
            params = build(folder, SHAPES[name], tokenizer_dir)
            disk = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
            for label, src in sources.items():
                if label not in args.codes or (label == "before" and args.before_shapes and name not in args.before_shapes):
                    continue
                for cmd, argv in commands(folder, work, args).items():
                    if cmd not in args.commands:
                        continue
                    r = run(argv, src)
                    rows.append({"model": name, "params": params, "fp16_gb": disk, "code": label, "command": cmd, **r})
                    print(f"{name:<10} {label:<7} {cmd:<9} peak RSS {r['rss_gb']:6.2f} GB  {r['seconds']:6.1f} s"
                          f"{'' if r['rc'] == 0 else '  FAILED rc=' + str(r['rc'])}", flush=True)
                    common.write_json(args.json, args, {}, rows, quiet=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'model':<10} {'params':>8} {'fp16 GB':>8} {'code':<7} {'command':<9} {'peak RSS GB':>11} {'s':>7}")
    for r in rows:
        print(f"{r['model']:<10} {r['params'] / 1e6:>7.0f}M {r['fp16_gb']:>8.2f} {r['code']:<7} {r['command']:<9} "
              f"{r['rss_gb']:>11.2f} {r['seconds']:>7.1f}")
    for label in sources:
        for cmd in ("quantize", "eval", "measure", "budget", "search", "select"):
            peak = {r["model"]: r["rss_gb"] for r in rows if r["code"] == label and r["command"] == cmd}
            if "d4-h1024" in peak and "d32-h1024" in peak:
                ratio = peak["d32-h1024"] / peak["d4-h1024"]
                print(f"{label} {cmd}: 32-layer / 4-layer peak RSS = {ratio:.2f} (target ≤ 1.25)")
            for moe, shape in MOE_SHAPES.items():
                dense = f"d{shape[0]}-h{shape[1]}"
                if moe in peak and dense in peak:
                    print(f"{label} {cmd}: {moe} ({shape[5]} experts, {shape[6]} per token) / {dense} (same active "
                          f"size) peak RSS = {peak[moe] / peak[dense]:.2f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
