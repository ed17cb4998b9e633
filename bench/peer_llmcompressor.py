"""llm-compressor's GPTQ (``oneshot`` with ``GPTQModifier``, its defaults) on given calibration
windows; writes the fake-quantized decoder weights it leaves in the model. Runs in llm-compressor's
own environment (it pins its own transformers), so it imports nothing from hmq:

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python bench/peer_llmcompressor.py --model FOLDER --windows calib.pt \\
        --bits 3 --group-size 64 --out w.safetensors

``bench/peers.py`` calls it and evaluates the weights with hmq's evaluation code on the same
windows as hmq's own model. ``--group-size -1`` is per channel; ``--sym`` a symmetric grid;
``--actorder`` passes GPTQModifier's ``actorder`` (default: its own default, ``static``).
"""
from __future__ import annotations

import time

from peer_io import leave_bench_folder, peer_parser, save_linear_weights

leave_bench_folder()


def main() -> None:
    ap = peer_parser(__doc__)
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQModifier dampening_frac (default 0.01, its own)")
    ap.add_argument("--actorder", default=None, help="static, group, weight or none (default: llm-compressor's)")
    args = ap.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = torch.load(args.windows)  # (n, seqlen)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym,
                               strategy="channel" if args.group_size == -1 else "group",
                               group_size=None if args.group_size == -1 else args.group_size)
    extra = {} if args.actorder is None else {"actorder": None if args.actorder == "none" else args.actorder}
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=args.damp, **extra)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - t0
    save_linear_weights(model, args.out, seconds, vars(args), "llm-compressor")


if __name__ == "__main__":
    main()
