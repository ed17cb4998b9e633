"""Run the reference GPTQ (IST-DASLab/gptq) beside hmq on the same model, calibration windows and
evaluation windows, and print both perplexities.

The reference code is not part of hmq: check it out yourself and pass its folder, e.g.
    git clone https://github.com/IST-DASLab/gptq /tmp/gptq-ref
    python bench/peer_gptq.py --ref /tmp/gptq-ref --bits 3
Its ``GPTQ``/``Quantizer`` classes are imported as they are and driven by the reference's own
true-sequential recipe (a full layer forward per step, hooks with ``add_batch``, ``fasterquant``);
only the model plumbing (capturing layer-0 inputs, calling a transformers-5 decoder layer) is ours.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from quant.capture import capture_layer_inputs, run_layer
from calibration.data import calibration_windows, eval_tokens
from quant.config import QuantConfig
from quant.evaluate import perplexity
from quant.model_io import load_model
from quant.pipeline import quantize_model


def _import_reference(ref_dir: Path):
    """Load the reference's quant.py and gptq.py under private names (its ``quant`` clashes with ours)."""
    import importlib.util

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally

    def load(name, file):
        spec = importlib.util.spec_from_file_location(name, ref_dir / file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    ref_quant = load("gptq_reference_quant", "quant.py")
    ours = sys.modules.get("quant")
    sys.modules["quant"] = ref_quant  # for the reference's `from quant import *`
    try:
        ref_gptq = load("gptq_reference_gptq", "gptq.py")
    finally:
        sys.modules["quant"] = ours
    return ref_gptq.GPTQ, ref_quant.Quantizer


def reference_gptq(model, arch, windows, bits, group_size, ref_dir):
    GPTQ, Quantizer = _import_reference(Path(ref_dir))

    layers = model.model.layers
    inputs = capture_layer_inputs(model, layers, windows, torch.device("cpu"), 1)
    for layer in layers:
        for names in arch.at(layer).sequential:
            g = {}
            for n in names:
                g[n] = GPTQ(layer.get_submodule(n))
                g[n].quantizer = Quantizer()
                g[n].quantizer.configure(bits, perchannel=True, sym=False, mse=False)
            hooks = [layer.get_submodule(n).register_forward_hook(
                lambda m, inp, out, n=n: g[n].add_batch(inp[0].data, out.data)) for n in names]
            run_layer(layer, inputs)
            for h in hooks:
                h.remove()
            for n in names:
                g[n].fasterquant(blocksize=128, percdamp=0.01, groupsize=group_size)
                g[n].free()
        inputs = run_layer(layer, inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="folder of an IST-DASLab/gptq checkout")
    ap.add_argument("--bits", type=int, nargs="+", default=[3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--reference-only", action="store_true", help="skip hmq's run (compare with bench/ppl_table.py)")
    ap.add_argument("--json", default="bench/results/peer_gptq.json")
    args = ap.parse_args()
    base, tokenizer, arch = load_model(None)
    calib = calibration_windows(tokenizer, None, args.nsamples, args.seqlen, 0)
    _, ids = eval_tokens(tokenizer)
    rows = []
    for bits in args.bits:
        ref = copy.deepcopy(base)
        t0 = time.perf_counter()
        with torch.no_grad():
            reference_gptq(ref, arch, calib, bits, args.group_size, Path(args.ref))
        t_ref = time.perf_counter() - t0
        p_ref = perplexity(ref, ids, 512, args.windows, progress=False)["ppl"]
        del ref
        row = {"bits": bits, "reference_ppl": p_ref, "reference_seconds": t_ref}
        if not args.reference_only:
            ours = copy.deepcopy(base)
            rep = quantize_model(ours, arch, calib, QuantConfig(bits=bits, group_size=args.group_size,
                                                                partial_groups=True, clip=False,
                                                                act_order=False), torch.device("cpu"), progress=False)
            row.update(hmq_ppl=perplexity(ours, ids, 512, args.windows, progress=False)["ppl"], hmq_seconds=rep.seconds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
