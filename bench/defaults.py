"""Choose hmq's GPTQ defaults on selection text: every solver variant at every scheme, scored by
perplexity and KL divergence from the fp model on the **selection** part of the corpus (never the
reporting part; see calibration/data.py).

    python bench/defaults.py --schemes w3g64 w4g64 w2g64 w3g-1 --seeds 0
    python bench/defaults.py --schemes w3g64 --variants plain static static-noclip --json /tmp/d.json

Variants: ``plain`` (columns in their own order, range search), ``plain-noclip`` (textbook GPTQ),
``act`` (Hessian order with groups following it: needs g_idx at inference), ``static`` (Hessian
order, groups fixed from the original weights and kept contiguous: no g_idx), ``static-noclip``,
``static-reached`` (contiguous groups whose scale/zero are set from their error-updated values when
the solve first reaches one of their columns), ``default`` (hmq's defaults), ``unweighted`` (the range
search counts every column's error the same), ``power1`` / ``power0.5`` (weighted by diag(H) to that
power at every width), ``rtn``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from unittest import mock

import torch

import common
from quant.model_io import load_model

VARIANTS = {
    "plain": {"act_order": False, "static_groups": False, "clip": True},
    "plain-noclip": {"act_order": False, "static_groups": False, "clip": False},
    "act": {"act_order": True, "static_groups": False, "clip": True},
    "static": {"act_order": True, "static_groups": True, "clip": True, "group_params": "original"},
    "static-noclip": {"act_order": True, "static_groups": True, "clip": False, "group_params": "original"},
    "static-reached": {"act_order": True, "static_groups": True, "clip": True, "group_params": "reached"},
    "default": {},  # hmq's defaults as they now are
    "weighted": {"clip_both": False, "clip_layer": "off"},  # the weighted range search alone (the default before clip_both)
    "unweighted": {"clip_weighted": False},  # … with every column's error counted the same in the range search
    "rtn": {"method": "rtn"},  # round-to-nearest (min/max ranges): no calibration, so one seed stands for all
    # the weighted range search with diag(H) to a fixed power at every width (the default picks it by
    # width: quant.quantizer.weight_power)
    "power1": {"_power": 1.0, "clip_both": False, "clip_layer": "off"},
    "power0.5": {"_power": 0.5, "clip_both": False, "clip_layer": "off"},
    # the weighted range search with GPTQ's own column weights 1/U_jj² (U: the Cholesky factor of
    # H⁻¹ in solve order) instead of diag(H), at the default power by width
    "obs": {"_energy": "obs", "clip_both": False, "clip_layer": "off"},
    # diag(H) at the default power, no column above 10 or 100 times the median of its group
    "cap10": {"_cap": 10.0, "clip_both": False, "clip_layer": "off"},
    "cap100": {"_cap": 100.0, "clip_both": False, "clip_layer": "off"},
    # the range search picked per decoder layer by its output (clip_layer) at every width; the row mix alone
    "layer-pick": {"clip_layer": "on"},
    "rowmix": {"clip_layer": "off"},  # both searches row by row, no per-layer pick (the default before it)
}


def _quantize(base, arch, windows, spec, device, variant: str):
    from quant.methods import clip_search
    from quant.quantizer import weight_power

    settings = dict(VARIANTS[variant])
    power, energy, cap = settings.pop("_power", None), settings.pop("_energy", "diag"), settings.pop("_cap", 0.0)

    def search(config, bits):  # the default range search, with the variant's power and energy source
        found = clip_search(config, bits)
        return found and dataclasses.replace(found, power=weight_power(bits) if power is None else power, energy=energy,
                                             cap=cap)

    with mock.patch("quant.methods.clip_search", search):
        return common.hmq_quantize(base, arch, windows, spec, device, partial_groups=True, **settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the offline SmolLM2-135M-Instruct)")
    ap.add_argument("--schemes", nargs="+", default=["w3g64", "w4g64", "w2g64", "w3g-1"])
    ap.add_argument("--variants", nargs="+", default=["static", "static-noclip"], choices=sorted(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="selection windows")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--json", default="bench/results/defaults.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok, arch = load_model(args.model)
    sel = common.texts(base, tok, "select", args.windows, args.eval_seqlen, device)
    print(f"fp on selection text: ppl {sel.fp['ppl']:.3f}", flush=True)
    rows = []
    for seed in args.seeds:
        windows = common.calib(tok, args.nsamples, args.seqlen, seed)
        for label in args.schemes:
            spec = common.parse_scheme(label)
            for variant in args.variants:
                t0 = time.perf_counter()
                model, report = _quantize(base, arch, windows, spec, device, variant)
                res = common.evaluate(model, sel, device)
                rows.append({"scheme": label, "variant": variant, "seed": seed, "bpw": report.bpw,
                             "quant_seconds": report.seconds, **res,
                             **({"layer_picks": report.range_picks} if report.range_picks else {})})
                print(f"{label} {variant} seed {seed}: ppl {res['ppl']:.3f} kl {res['kl']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                del model

    print(f"\n{args.model or 'SmolLM2-135M-Instruct'}, calibration {args.nsamples}×{args.seqlen} (seeds "
          f"{args.seeds}), selection text {args.windows}×{args.eval_seqlen} tokens (fp {sel.fp['ppl']:.2f}), "
          f"{common.machine()}")
    print(f"| {'scheme':<8} | {'variant':<14} | {'selection ppl':>16} | {'KL (nats)':>18} |")
    print(f"|{'-' * 10}|{'-' * 16}|{'-' * 18}|{'-' * 20}|")
    for label in args.schemes:
        for variant in args.variants:
            rs = [r for r in rows if r["scheme"] == label and r["variant"] == variant]
            print(f"| {label:<8} | {variant:<14} | {common.fmt([r['ppl'] for r in rs]):>16} | "
                  f"{common.fmt([r['kl'] for r in rs], 4):>18} |")
    common.write_json(args.json, args, sel.fp, rows)


if __name__ == "__main__":
    main()
