"""Perplexity's KL divergence and top-1 agreement against a reference model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quant.evaluate import kl_terms, perplexity, reference_logprobs

from .conftest import build_tiny


def model_and_perturbed():
    """A tiny model and a copy of it with every weight moved a little (a stand-in for quantization)."""
    model, other = build_tiny("llama"), build_tiny("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, other


def test_kl_against_itself_is_zero_and_top1_agrees():
    model = build_tiny("llama")
    ids = torch.randint(0, 256, (4 * 32,), generator=torch.Generator().manual_seed(0))
    ref, own = reference_logprobs(model, ids, 32, progress=False)
    assert own["ppl"] == perplexity(model, ids, 32, progress=False)["ppl"]
    assert len(ref) == 4 and ref[0].shape == (31, model.config.vocab_size)
    res = perplexity(model, ids, 32, progress=False, reference=ref)
    assert res["kl"] < 1e-3 and res["top1"] == 1.0


def test_kl_of_a_changed_model_matches_the_definition():
    model, other = model_and_perturbed()
    ids = torch.randint(0, 256, (3 * 32,), generator=torch.Generator().manual_seed(1))
    ref, _ = reference_logprobs(model, ids, 32, progress=False)
    res = perplexity(other, ids, 32, progress=False, reference=ref)
    with torch.no_grad():
        kls, agree = [], 0
        for w in range(3):
            x = ids[w * 32 : (w + 1) * 32][None]
            p = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            q = F.log_softmax(other(input_ids=x).logits[0, :-1].float(), -1)
            kls.append(F.kl_div(q, p, log_target=True, reduction="none").sum(-1))
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    want = torch.cat(kls).mean().item()
    assert res["kl"] > 1e-3
    assert res["kl"] == pytest.approx(want, rel=2e-2)  # the reference is kept in fp16
    assert res["top1"] == pytest.approx(agree / (3 * 31), abs=2 / 93)
    # each window's own mean KL and NLL, in window order, for paired comparisons
    assert res["window_kl"] == pytest.approx([k.mean().item() for k in kls], rel=2e-2)
    assert len(set(res["window_kl"])) == 3
    assert sum(res["window_nll"]) / 3 == pytest.approx(res["nll"], rel=1e-9)
    with torch.no_grad():
        nll = [F.cross_entropy(other(input_ids=ids[w * 32 : (w + 1) * 32][None]).logits[0, :-1].float(),
                               ids[w * 32 + 1 : (w + 1) * 32]).item() for w in range(3)]
    assert res["window_nll"] == pytest.approx(nll, rel=1e-4)


def test_kl_terms_is_kl_of_the_model_from_the_reference():
    """KL(reference ‖ model), not the reverse: on a clearly asymmetric pair the two directions differ."""
    g = torch.Generator().manual_seed(2)
    ref = F.log_softmax(3 * torch.randn(6, 17, generator=g), -1)
    model = F.log_softmax(torch.randn(6, 17, generator=g), -1)
    kl, _ = kl_terms(model, ref)
    want = F.kl_div(model, ref, log_target=True, reduction="none").sum(-1)  # Σ ref · (log ref − log model)
    reverse = F.kl_div(ref, model, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kl, reverse, rtol=0.1)


def test_kl_terms_is_never_negative():
    p = F.log_softmax(torch.randn(5, 11), -1)
    kl, same = kl_terms(p, p.half())
    assert (kl >= 0).all() and same.all()


def test_a_reference_of_other_windows_is_refused():
    model = build_tiny("llama")
    ids = torch.randint(0, 256, (4 * 32,))
    ref, _ = reference_logprobs(model, ids, 32, max_windows=2, progress=False)
    with pytest.raises(ValueError, match="same ids, seqlen and max_windows"):
        perplexity(model, ids, 32, progress=False, reference=ref)


def test_kl_beside_a_reference_model_in_one_sweep_equals_the_kept_log_probs():
    """The lockstep sweep (reference model beside the model) gives the same KL, top-1 and both
    perplexities as the two-pass way, which keeps the reference's log-probabilities."""
    model, other = model_and_perturbed()
    ids = torch.randint(0, 256, (5 * 32,), generator=torch.Generator().manual_seed(3))
    ref, own = reference_logprobs(model, ids, 32, progress=False)
    kept = perplexity(other, ids, 32, progress=False, reference=ref, batch_size=2)
    paired = perplexity(other, ids, 32, progress=False, reference_model=model, batch_size=2)
    assert paired["ppl"] == kept["ppl"] and paired["reference"]["ppl"] == own["ppl"]
    assert paired["kl"] > 1e-3 and paired["kl"] == pytest.approx(kept["kl"], rel=2e-2)  # kept in fp16
    assert paired["top1"] == pytest.approx(kept["top1"], abs=2 / 155)
    assert paired["window_nll"] == kept["window_nll"] and paired["reference"]["window_nll"] == own["window_nll"]
    assert paired["window_kl"] == pytest.approx(kept["window_kl"], rel=2e-2)
    assert paired["kl_median"] <= paired["kl_p90"] <= paired["kl_p99"] <= paired["kl_p999"] <= paired["kl_max"]
    with pytest.raises(ValueError, match="not both"):
        perplexity(other, ids, 32, progress=False, reference=ref, reference_model=model)


def test_kl_quantiles_interpolate_as_torch_quantile():
    from quant.evaluate import kl_quantiles

    kl = torch.arange(1, 1001, dtype=torch.float32).flip(0)  # 1..1000, unsorted
    q = kl_quantiles(kl)
    assert q == pytest.approx({k: float(torch.quantile(kl, v)) for k, v in {"kl_median": 0.5, "kl_p90": 0.9, "kl_p99": 0.99, "kl_p999": 0.999, "kl_max": 1.0}.items()})
    assert q["kl_median"] == 500.5 and q["kl_max"] == 1000.0
    assert kl_quantiles(torch.tensor([0.25]))["kl_median"] == 0.25


def test_a_reference_model_of_another_vocabulary_is_refused_before_the_sweep():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_tiny("llama")
    cfg = LlamaConfig(**{**model.config.to_dict(), "vocab_size": model.config.vocab_size + 8})
    other = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (2 * 32,))
    with pytest.raises(ValueError, match="vocabulary"):
        perplexity(model, ids, 32, progress=False, reference_model=other)


@pytest.mark.parametrize("windows,positions,tokens", [(8, 511, 512), (24, 511, 128), (3, 1023, 512), (5, 7, 512), (1, 1, 4)])
def test_head_blocks_cover_every_position_once_within_the_token_cap(windows, positions, tokens):
    from quant.engine import head_blocks

    seen = torch.zeros(windows, positions, dtype=torch.int64)
    for w, a, b in head_blocks(windows, positions, tokens):
        assert (w.stop - w.start) * (b - a) <= max(tokens, 1) and b > a and w.stop > w.start
        seen[w, a:b] += 1
    assert bool((seen == 1).all())
