"""What the peer scripts share (they run in the peers' own environments, so this imports only torch
and safetensors): write the fake-quantized linear weights a peer leaves in its model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def leave_bench_folder() -> None:
    """Take bench/ off the import path once the peer script has what it needs from here, so that no
    script there can ever shadow a package a peer imports (a ``kernels.py`` once hid Hugging Face's
    ``kernels``, which newer transformers import)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def peer_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every peer script takes from bench/peers.py (a peer adds its own)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--windows", required=True, help="torch file holding an (n, seqlen) int64 tensor of token ids")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True, help="-1: one group per output channel")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--out", required=True, help="safetensors file for the fake-quantized linear weights")
    return ap


def save_linear_weights(model, out: str, seconds: float, settings: dict, tool: str) -> None:
    """Every ``nn.Linear`` weight but ``lm_head``'s, fp32, to the safetensors file ``out``."""
    import torch
    from safetensors.torch import save_file

    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            state[f"{name}.weight"] = mod.weight.detach().to(torch.float32).contiguous().clone()
    save_file(state, out, metadata={"seconds": f"{seconds:.1f}", "settings": json.dumps(settings)})
    print(f"{tool}: {len(state)} linears in {seconds:.0f} s -> {out}")
