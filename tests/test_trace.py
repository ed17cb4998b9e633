"""Hutchinson's estimator against exact traces: an explicit matrix, and a tiny model's exact Hessian;
the layer-by-layer Hessian-vector products against the whole-model double backward on the same probes."""
import math

import pytest
import torch

from calibration.curvature import fisher_traces, hutchinson_traces, mean_gradients, rademacher
from calibration.trace import hutchinson
from quant.arch import get_arch

from .conftest import build_tiny, windows

ARCH = get_arch("llama")


def _matrix_sampler(H, split, seed):
    """``vᵀ(Hv)`` per block for Rademacher probes drawn in order from one generator."""
    gen = torch.Generator().manual_seed(seed)

    def sample(probes):
        rows = []
        for _ in probes:
            v = (torch.randint(0, 2, (H.shape[0],), generator=gen) * 2 - 1).float()
            rows.append([float(a @ b) for a, b in zip(torch.split(v, split), torch.split(H @ v, split))])
        return rows

    return sample


def test_hutchinson_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g)
    H = A @ A.T / 30 + torch.diag(torch.linspace(0.5, 3, 30))  # two blocks: rows 0..11 and 12..29
    est = hutchinson(_matrix_sampler(H, [12, 18], 1), tol=0.0, max_probes=2000, per_call=64)
    exact = [float(H[:12, :12].trace()), float(H[12:, 12:].trace())]
    for m, s, e in zip(est.mean, est.se, exact):
        assert abs(m - e) < 4 * s and s < 0.05 * e
    # the stopping rule: a loose tolerance stops early, with every relative error below it, and at the
    # same probe whether the probes come one or several per call
    quick = hutchinson(_matrix_sampler(H, [12, 18], 2), tol=0.1, min_probes=4, max_probes=2000)
    assert quick.probes < 2000 and quick.rel_se() <= 0.1
    chunked = hutchinson(_matrix_sampler(H, [12, 18], 2), tol=0.1, min_probes=4, max_probes=2000, per_call=7)
    assert chunked.probes == quick.probes and chunked.mean == quick.mean


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
        est = hutchinson_traces(model, ARCH, [n], ids, torch.device("cpu"), tol=0.0, max_probes=probes, progress=False,
                                probes_per_sweep=50)
        assert abs(est.mean[0] - exact) < 4 * sd, (n, est.mean[0], exact, sd)
        assert 0.75 < est.se[0] / sd < 1.3, (n, est.se[0], sd)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


NAMES = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("self_attn.q_proj", "self_attn.v_proj",
                                                                    "mlp.gate_proj", "mlp.down_proj")]


def _whole_model_rows(model, names, ids, probes):
    """The reference: vᵀ(Hv) per block from one double-backward graph over the whole model."""
    model.set_attn_implementation("eager")
    params = [model.get_parameter(n) for n in names]
    g = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params, create_graph=True)
    rows = []
    for p in range(probes):
        v = [rademacher(0, p, k, q.shape, "cpu", q.dtype) for k, q in enumerate(params)]
        hv = torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True)
        rows.append([float((a * b).sum()) for a, b in zip(v, hv)])
    model.set_attn_implementation("sdpa")
    return torch.tensor(rows, dtype=torch.float64)


def test_layer_by_layer_hvp_equals_the_whole_model_double_backward():
    """Same probes, same estimate: each probe's vᵀ(Hv), cross-layer terms included, equals the
    whole-model graph's, whether the windows go as one batch or three, and whether the probes run
    one per sweep or several."""
    model = build_tiny("llama")
    ids = windows(3, 16)
    rows = _whole_model_rows(model, NAMES, ids, 3)
    for kw in (dict(), dict(max_batch_tokens=16, probes_per_sweep=1), dict(probes_per_sweep=2, chunk_tokens=5)):
        est = hutchinson_traces(model, ARCH, NAMES, ids, torch.device("cpu"), tol=0.0, max_probes=3, progress=False, **kw)
        assert est.probes == 3
        assert est.mean == pytest.approx(rows.mean(0).tolist(), rel=1e-4, abs=1e-6), kw
        assert est.se == pytest.approx((rows.std(0) / math.sqrt(3)).tolist(), rel=1e-3, abs=1e-6), kw
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert model.config._attn_implementation == "sdpa"


def test_stopping_rule_is_the_same_in_chunks():
    """Probes run several per sweep stop where probing one at a time would have stopped."""
    model = build_tiny("llama", num_hidden_layers=1)
    ids = windows(2, 16)
    names = NAMES[:4]
    one = hutchinson_traces(model, ARCH, names, ids, torch.device("cpu"), tol=1.5, max_probes=12, progress=False,
                            probes_per_sweep=1)
    four = hutchinson_traces(model, ARCH, names, ids, torch.device("cpu"), tol=1.5, max_probes=12, progress=False,
                             probes_per_sweep=5)
    assert 4 <= one.probes < 12 and four.probes == one.probes and four.mean == pytest.approx(one.mean, rel=1e-6)


def test_fisher_and_gradients_are_the_whole_model_ones():
    model = build_tiny("llama")
    ids = windows(3, 16)
    est = fisher_traces(model, ARCH, NAMES, ids, torch.device("cpu"), progress=False)
    params = [model.get_parameter(n) for n in NAMES]
    sq = []
    for w in ids:
        grads = torch.autograd.grad(model(input_ids=w[None], labels=w[None], use_cache=False).loss, params)
        sq.append([float(g.pow(2).sum()) for g in grads])
    assert est.mean == pytest.approx(torch.tensor(sq).mean(0).tolist(), rel=1e-4)
    assert est.probes == 3 and all(math.isfinite(s) for s in est.se)
    mean = mean_gradients(model, ARCH, NAMES, ids, torch.device("cpu"))
    whole = torch.autograd.grad(model(input_ids=ids, labels=ids, use_cache=False).loss, params)
    for n, g in zip(NAMES, whole):
        assert torch.allclose(mean[n], g, atol=1e-6, rtol=1e-4), n
