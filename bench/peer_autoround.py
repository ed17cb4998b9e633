"""AutoRound (signed-gradient rounding and range tuning per block) on given calibration windows;
writes the fake-quantized decoder weights it leaves in the model. Runs in AutoRound's own
environment, so it imports nothing from hmq:

    python -m venv /tmp/ar && /tmp/ar/bin/pip install torch==2.13.0 auto-round
    /tmp/ar/bin/python bench/peer_autoround.py --model FOLDER --windows calib.pt --bits 3 \\
        --group-size 64 --iters 20 --out w.safetensors

Its default is 200 iterations per block, about 10 minutes a decoder layer on 2 CPU cores: use few
here and its default on a GPU. ``bench/peers.py`` calls it.
"""
from __future__ import annotations

import time

from peer_io import peer_parser, save_linear_weights


def main() -> None:
    ap = peer_parser(__doc__)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.windows)  # (n, seqlen)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, bits=args.bits, group_size=args.group_size, sym=args.sym,
                   dataset=[row[None] for row in ids], nsamples=ids.shape[0], seqlen=ids.shape[1], iters=args.iters,
                   device_map="cpu")
    ar.quantize()
    seconds = time.perf_counter() - t0
    save_linear_weights(ar.model, args.out, seconds, vars(args), "AutoRound")


if __name__ == "__main__":
    main()
