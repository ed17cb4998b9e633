"""Hutchinson's estimator against exact traces: an explicit matrix, and a tiny model's exact Hessian."""
import math

import pytest
import torch

from calibration.trace import hutchinson, model_traces

from .conftest import build_tiny, windows


def test_hutchinson_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g)
    H = A @ A.T / 30 + torch.diag(torch.linspace(0.5, 3, 30))  # two blocks: rows 0..11 and 12..29
    hvp = lambda v: list(torch.split(H @ torch.cat([t.reshape(-1) for t in v]), [12, 18]))  # noqa: E731
    est = hutchinson(hvp, [torch.Size([12]), torch.Size([18])], tol=0.0, max_probes=2000,
                     generator=torch.Generator().manual_seed(1))
    exact = [float(H[:12, :12].trace()), float(H[12:, 12:].trace())]
    for m, s, e in zip(est.mean, est.se, exact):
        assert abs(m - e) < 4 * s and s < 0.05 * e
    # the stopping rule: a loose tolerance stops early, with every relative error below it
    quick = hutchinson(hvp, [torch.Size([12]), torch.Size([18])], tol=0.1, min_probes=4, max_probes=2000,
                       generator=torch.Generator().manual_seed(2))
    assert quick.probes < 2000 and quick.rel_se() <= 0.1


def test_hutchinson_tiny_model_exact_block_trace():
    """Against the exact Hessian block of a tiny model (torch.func.hessian): the estimate lies within
    4 standard errors of the exact trace, and its standard error matches the theoretical one,
    sqrt(2(‖H‖_F² − Σ H_ii²)/probes), so a wrong HVP scale or a biased probe would fail."""
    model = build_tiny("llama", hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=1)
    model.set_attn_implementation("eager")
    ids = windows(2, 16)
    probes = 400
    for n in ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
        p = model.get_parameter(n)

        def loss_of(w, n=n):
            return torch.func.functional_call(model, {n: w}, (ids,), {"labels": ids, "use_cache": False}).loss

        H = torch.func.hessian(loss_of)(p.detach().clone()).reshape(p.numel(), p.numel())
        exact = float(H.trace())
        sd = math.sqrt(2 * (float(H.pow(2).sum()) - float(H.diagonal().pow(2).sum())) / probes)
        est = model_traces(model, [n], ids, torch.device("cpu"), tol=0.0, max_probes=probes, progress=False)
        assert abs(est.mean[0] - exact) < 4 * sd, (n, est.mean[0], exact, sd)
        assert 0.75 < est.se[0] / sd < 1.3, (n, est.se[0], sd)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_hutchinson_in_batches_equals_one_graph():
    """Beyond ``max_batch_tokens`` each probe's Hessian-vector product is summed batch by batch (so
    long loss windows do not hold one huge double-backward graph): same probes, same estimate."""
    model = build_tiny("llama", num_hidden_layers=1)
    ids = windows(3, 16)
    names = ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    whole = model_traces(model, names, ids, torch.device("cpu"), tol=0.0, max_probes=3, progress=False)
    split = model_traces(model, names, ids, torch.device("cpu"), tol=0.0, max_probes=3, progress=False,
                         max_batch_tokens=32)  # batches of 2 and 1 windows
    assert split.probes == whole.probes == 3
    assert split.mean == pytest.approx(whole.mean, rel=1e-4) and split.se == pytest.approx(whole.se, rel=1e-3)


def test_fisher_trace_is_mean_squared_window_gradient():
    model = build_tiny("llama")
    ids = windows(3, 16)
    name = "model.layers.1.mlp.up_proj.weight"
    est = model_traces(model, [name], ids, torch.device("cpu"), method="fisher", progress=False)
    p = model.get_parameter(name)
    sq = []
    for w in ids:
        model.zero_grad()
        model(input_ids=w[None], labels=w[None], use_cache=False).loss.backward()
        sq.append(float(p.grad.pow(2).sum()))
    assert est.mean[0] == pytest.approx(sum(sq) / 3, rel=1e-4)
    assert est.probes == 3 and math.isfinite(est.se[0])
