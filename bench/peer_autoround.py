"""AutoRound (signed-gradient rounding and range tuning per block) on given calibration windows;
writes the fake-quantized decoder weights it leaves in the model. Runs in AutoRound's own
environment, so it imports nothing from hmq:

    python -m venv /tmp/ar && /tmp/ar/bin/pip install torch==2.13.0 auto-round
    /tmp/ar/bin/python bench/peer_autoround.py --model FOLDER --windows calib.pt --bits 3 \\
        --group-size 64 --iters 20 --out w.safetensors

Its default is 200 iterations per block, about 10 minutes a decoder layer on 2 CPU cores: use few
here and its default on a GPU. ``bench/peers.py`` calls it.

``--avg-bits B --widths 2,3,4`` runs AutoRound's own mixed precision instead: ``AutoScheme`` (its
delta-loss scores, then a per-layer choice among the widths at ``--group-size`` under an average of
B bits per quantized weight, scales and zero points included as hmq counts them) and AutoRound at
``--iters`` on that choice. AutoScheme reads its calibration as text, so the windows are decoded and
written as a JSON list beside ``--out`` (re-tokenized by AutoRound, at most ``seqlen`` tokens each).
The layers' widths go into the output's metadata. ``bench/default_mixed.py --autoround`` calls it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from peer_io import leave_bench_folder, peer_parser, save_linear_weights

leave_bench_folder()


def main() -> None:
    ap = peer_parser(__doc__)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--avg-bits", type=float, default=None, help="AutoScheme's mixed precision at this average")
    ap.add_argument("--widths", default="2,3,4", help="AutoScheme's candidate widths (with --avg-bits)")
    args = ap.parse_args()

    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.windows)  # (n, seqlen)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    if args.avg_bits is None:
        ar = AutoRound(model, tokenizer=tok, bits=args.bits, group_size=args.group_size, sym=args.sym,
                       dataset=[row[None] for row in ids], nsamples=ids.shape[0], seqlen=ids.shape[1],
                       iters=args.iters, device_map="cpu")
        ar.quantize()
        widths = {}
    else:
        from auto_round import AutoScheme
        from auto_round.schemes import QuantizationScheme

        text = Path(args.out).with_suffix(".calib.json")
        text.write_text(json.dumps([tok.decode(row, skip_special_tokens=True) for row in ids]))
        options = [QuantizationScheme(bits=int(w), group_size=args.group_size, sym=args.sym, act_bits=16)
                   for w in args.widths.split(",")]
        scheme = AutoScheme(avg_bits=args.avg_bits, options=options, nsamples=ids.shape[0], seqlen=ids.shape[1])
        ar = AutoRound(model, tokenizer=tok, scheme=scheme, dataset=str(text), nsamples=ids.shape[0],
                       seqlen=ids.shape[1], iters=args.iters, device_map="cpu")
        ar.quantize()
        widths = {name: int(cfg["bits"]) for name, cfg in ar.layer_config.items() if cfg.get("bits") is not None}
    seconds = time.perf_counter() - t0
    save_linear_weights(ar.model, args.out, seconds, vars(args) | {"widths": widths}, "AutoRound")


if __name__ == "__main__":
    main()
