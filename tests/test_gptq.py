import logging

import pytest
import torch

from quant.capture import capture_layer_inputs, collect_hessians
from quant.config import ModuleSpec
from quant.gptq import gptq_quantize
from quant.quantizer import ClipSearch, best_rows, compute_qparams, fake_quantize, row_errors, rtn_quantize, search_qparams

from .conftest import build_tiny, windows


def output_error(qw, w, X):
    return ((X @ (qw.dequantize() - w).T) ** 2).mean().item()  # ‖(Ŵ - W) X‖² per element


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_codes_and_params_in_range(bits, group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.05
    qw = rtn_quantize(w, ModuleSpec(bits, group_size, sym))
    assert int(qw.intweight.max()) <= 2**bits - 1
    assert torch.equal(qw.scales, qw.scales.half().float())  # stored exactly in fp16
    assert int(qw.zeros.min()) >= 1
    # rounding error is at most half a step wherever the value lies inside the grid
    err = (qw.dequantize() - w).abs()
    step = qw.scales[qw.g_idx.long()].T
    assert (err <= step * 0.5 + 1e-6).float().mean() > 0.95


def test_partial_last_group():
    torch.manual_seed(0)
    w = torch.randn(8, 96)
    qw = rtn_quantize(w, ModuleSpec(4, 64))
    assert qw.scales.shape == (2, 8) and int(qw.g_idx.max()) == 1
    assert torch.equal(qw.scales[1], compute_qparams(w[:, 64:], 4, False)[0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_with_identity_hessian_is_rtn(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(24, 128)
    spec = ModuleSpec(bits, group_size, sym)
    g, r = gptq_quantize(w, torch.eye(128), spec, damp_percent=0.01), rtn_quantize(w, spec)
    assert torch.equal(g.intweight, r.intweight)
    assert torch.equal(g.scales, r.scales) and torch.equal(g.zeros, r.zeros)


@pytest.fixture(scope="module")
def real_activations():
    """Inputs of layer 0's q_proj and down_proj in a tiny Llama on token windows."""
    model = build_tiny("llama")
    layers = model.model.layers
    inputs = capture_layer_inputs(model, layers, windows(16, 64), torch.device("cpu"), 8)
    H, kept = collect_hessians(layers[0], ["self_attn.q_proj", "mlp.down_proj"], inputs,
                               keep_inputs=("self_attn.q_proj", "mlp.down_proj"))
    return layers[0], H, {n: torch.cat(v).reshape(-1, v[0].shape[-1]) for n, v in kept.items()}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.down_proj"])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_layer_error_below_rtn(real_activations, bits, module, act_order, static):
    layer, H, X = real_activations
    w = layer.get_submodule(module).weight
    spec = ModuleSpec(bits, 32, False)
    g = gptq_quantize(w, H[module], spec, act_order=act_order, static_groups=static)
    r = rtn_quantize(w, spec)
    assert output_error(g, w, X[module]) < output_error(r, w, X[module])


def test_act_order_keeps_group_index_per_column(real_activations):
    layer, H, _ = real_activations
    w = layer.get_submodule("mlp.down_proj").weight
    qw = gptq_quantize(w, H["mlp.down_proj"], ModuleSpec(4, 32), act_order=True)
    assert qw.g_idx.shape == (w.shape[1],)
    assert torch.bincount(qw.g_idx.long()).tolist() == [32] * (w.shape[1] // 32)
    assert not torch.equal(qw.g_idx, torch.arange(w.shape[1], dtype=torch.int32) // 32)  # really permuted


@pytest.fixture
def hmq_log(caplog):
    """caplog wired to the "hmq" logger directly (the CLI turns its propagation off)."""
    logger = logging.getLogger("hmq")
    logger.addHandler(caplog.handler)
    propagate, logger.propagate = logger.propagate, False  # else caplog sees each record twice when run alone
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


def test_failed_cholesky_retries_then_falls_back_loudly(hmq_log):
    caplog = hmq_log
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    H = -torch.eye(32)  # negative definite: no damping makes it factorizable
    with caplog.at_level(logging.WARNING, logger="hmq"):
        qw = gptq_quantize(w, H, ModuleSpec(4, 32), name="layers.7.mlp.up_proj")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying" in m for m in messages) == 4
    assert all("layers.7.mlp.up_proj" in m for m in messages)
    assert any("falling back to round-to-nearest" in m for m in messages)
    assert torch.equal(qw.intweight, rtn_quantize(w, ModuleSpec(4, 32)).intweight)


def test_damping_retry_recovers_a_singular_hessian(hmq_log):
    caplog = hmq_log
    torch.manual_seed(0)
    x = torch.randn(4, 32)
    H = 2 * x.T @ x  # rank 4 of 32
    H -= 0.05 * torch.eye(32) * H.diagonal().mean()  # indefinite: 1% damping fails, 10% works
    with caplog.at_level(logging.WARNING, logger="hmq"):
        gptq_quantize(torch.randn(8, 32), H, ModuleSpec(4, 32), name="layers.0.q")
    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying" in m for m in messages) and not any("falling back" in m for m in messages)


def test_dead_inputs_get_zero_weight():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 5] = 0
    qw = gptq_quantize(torch.randn(8, 32), 2 * x.T @ x / 256, ModuleSpec(4, 32))
    assert torch.all(qw.dequantize()[:, 5] == 0)



@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_leaves_weight_and_hessian_as_they_were(act_order):
    """The factor works on its own copy of H (the learned-grid path solves twice against one H)."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 3] = 0
    H, w = 2 * x.T @ x / 256, torch.randn(16, 64).to(torch.bfloat16)
    H0, w0 = H.clone(), w.clone()
    first = gptq_quantize(w, H, ModuleSpec(3, 32), act_order=act_order, static_groups=True)
    assert torch.equal(H, H0) and torch.equal(w, w0)
    again = gptq_quantize(w, H, ModuleSpec(3, 32), act_order=act_order, static_groups=True)
    assert torch.equal(first.intweight, again.intweight) and first.intweight.dtype == torch.uint8
    assert torch.all(first.dequantize()[:, 3] == 0)

def _norm_err(w, scale, zero, bits, norm=2.4):
    return (fake_quantize(w, scale, zero, bits) - w).abs().pow(norm).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_worse_and_clips_outliers(bits, sym):
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02  # heavy tails, like LLM weights
    plain = compute_qparams(w, bits, sym)
    assert all(torch.equal(a, b) for a, b in zip(search_qparams(w, bits, sym, None), plain))
    scale, zero = search_qparams(w, bits, sym, ClipSearch())
    assert torch.equal(scale, scale.half().float()) and int(zero.min()) >= 1 and int(zero.max()) <= 2**bits - 1
    before, after = _norm_err(w, *plain, bits), _norm_err(w, scale, zero, bits)
    assert (after <= before).all()
    assert (after < before).float().mean() > 0.5 and after.sum() < 0.95 * before.sum()  # heavy tails gain
    assert (scale < plain[0]).float().mean() > 0.5  # by narrowing the grid: outliers saturate
    # the best of the shrinks it tries: no shrink on its grid does better on any row
    for i in range(0, 80, 7):
        s, z = compute_qparams(w * (1 - i / 100), bits, sym)
        assert (after <= _norm_err(w, s, z, bits) + 1e-12).all()


def _textbook_search(w, bits, sym, clip, energy=None):
    """The range search as its docstring says, shrink by shrink with torch.round: the fast one must equal it."""
    from quant.quantizer import max_code, range_qparams

    weight = torch.ones(w.shape[1], device=w.device) if energy is None else energy / energy.mean()

    lo, hi = w.amin(1), w.amax(1)
    best, scale, zero = torch.full((w.shape[0],), float("inf"), device=w.device), None, None
    for i in range(int(clip.maxshrink * clip.grid)):
        s, z = range_qparams((1 - i / clip.grid) * lo, (1 - i / clip.grid) * hi, bits, sym)
        q = (torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, max_code(bits)) - z[:, None]) * s[:, None]
        e = (q - w).abs().pow(clip.norm)
        e = (e if energy is None else e * weight).sum(1)
        if scale is None:
            scale, zero = s, z
        better = e < best
        best, scale, zero = torch.where(better, e, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_equals_the_textbook_search_bit_for_bit(bits, sym, device, weighted):
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((3000, 64)) * 0.02  # more rows than one chunk
    w[0] = 0.0  # a constant row
    w[1, :8] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 0.25, 0.75, 1.0])  # values on half steps
    w[2, 0] = 1e6  # a far outlier: codes beyond the magic number's exact range
    energy = torch.rand(64).pow(4) * 100 if weighted else None
    got = [t.cpu() for t in search_qparams(w.to(device), bits, sym, ClipSearch(), energy)]
    want = [t.cpu() for t in _textbook_search(w.to(device), bits, sym, ClipSearch(), energy)]  # on the same device
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if weighted:  # the same energy with the weighting off is the unweighted search
        off = search_qparams(w.to(device), bits, sym, ClipSearch(weighted=False), energy)
        plain = _textbook_search(w.to(device), bits, sym, ClipSearch())
        assert torch.equal(off[0].cpu(), plain[0].cpu()) and torch.equal(off[1].cpu(), plain[1].cpu())


@pytest.mark.parametrize("bits,group_size", [(3, -1), (3, 32), (2, 64), (4, -1)])
def test_weighted_range_search_spares_a_weight_that_meets_a_massive_activation(bits, group_size):
    """SmolLM2's layer-11 down_proj in small: two inputs carry 10^5-10^6x the median energy and their
    weights are 5-8x the rest of the row's. The unweighted search clips them to give the bulk a finer
    step, and GPTQ cannot undo that; weighted by diag(H) it keeps them, and the output error falls."""
    torch.manual_seed(bits)
    rows, cols = 48, 128
    w = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    w[:, [5, 70]] = torch.randn(rows, 2) * 0.15
    x = torch.randn(4096, cols)
    x[:, [5, 70]] *= torch.tensor([800.0, 300.0])  # massive activations on two channels
    H = 2 * x.T @ x / x.shape[0]
    spec = ModuleSpec(bits, group_size, False)
    kw = dict(act_order=True, static_groups=True, group_params="reached")
    err = {}
    for weighted in (False, True):
        q = gptq_quantize(w, H, spec, clip=ClipSearch(weighted=weighted), **kw)
        dW = q.dequantize(torch.float32) - w
        err[weighted] = float(((dW @ H) * dW).sum() / ((w @ H) * w).sum())
    plain = gptq_quantize(w, H, spec, clip=None, **kw)
    dW = plain.dequantize(torch.float32) - w
    noclip = float(((dW @ H) * dW).sum() / ((w @ H) * w).sum())
    assert err[True] < 0.5 * err[False], err  # the unweighted search's clipping costs at least 2x
    assert err[True] <= 1.05 * noclip, (err, noclip)  # and weighted it is no worse than no search at all


def test_range_search_energy_cap_and_gptq_weights():
    """The experimental weightings: a cap clamps each energy at cap x the median of the columns
    searched together (the search then equals one given those energies); GPTQ's own column weights
    1/U_jj² are constant for H = I, which makes the weighted search the unweighted one."""
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((200, 64)) * 0.02
    energy = torch.rand(64).pow(4) * 100
    energy[3] = 1e7
    capped = search_qparams(w, 3, False, ClipSearch(cap=10.0), energy)
    by_hand = search_qparams(w, 3, False, ClipSearch(), torch.minimum(energy, 10 * energy.median()))
    assert torch.equal(capped[0], by_hand[0]) and torch.equal(capped[1], by_hand[1])
    assert not torch.equal(capped[0], search_qparams(w, 3, False, ClipSearch(), energy)[0])
    spec = ModuleSpec(3, 32, False)
    eye = torch.eye(64)
    obs = gptq_quantize(w, eye, spec, clip=ClipSearch(energy="obs"))
    plain = gptq_quantize(w, eye, spec, clip=ClipSearch(weighted=False))
    assert torch.equal(obs.intweight, plain.intweight) and torch.equal(obs.scales, plain.scales)


@pytest.mark.parametrize("group_size", [-1, 32])
def test_clip_reaches_gptq_and_rtn(group_size):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((24, 128)) * 0.02
    spec = ModuleSpec(2, group_size, False)
    g = gptq_quantize(w, torch.eye(128), spec, clip=ClipSearch())
    r = rtn_quantize(w, spec, ClipSearch())
    assert torch.equal(g.intweight, r.intweight) and torch.equal(g.scales, r.scales)
    assert not torch.equal(r.scales, rtn_quantize(w, spec).scales)


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.down_proj"])
def test_clip_lowers_gptq_layer_error_at_2_bits(real_activations, module):
    layer, H, X = real_activations
    w = layer.get_submodule(module).weight
    spec = ModuleSpec(2, 32, False)
    plain = gptq_quantize(w, H[module], spec)
    clipped = gptq_quantize(w, H[module], spec, clip=ClipSearch())
    assert output_error(clipped, w, X[module]) < output_error(plain, w, X[module])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_config_clip_reaches_the_methods(real_activations, method):
    from quant.config import QuantConfig
    from quant.methods import get_method

    layer, H, _ = real_activations
    w = layer.get_submodule("mlp.down_proj").weight
    spec = ModuleSpec(2, 32, False)
    fn = get_method(method).fn
    on = fn(w, H["mlp.down_proj"], spec, QuantConfig(clip=True), "down")
    off = fn(w, H["mlp.down_proj"], spec, QuantConfig(clip=False), "down")
    if method == "gptq":  # the default rules at 2 bits: each row from the weighted or the unweighted search's solve
        kw = dict(act_order=True, static_groups=True, group_params="reached")
        both = [gptq_quantize(w, H["mlp.down_proj"], spec, clip=ClipSearch(power=0.5, weighted=weighted), **kw)
                for weighted in (True, False)]
        want, pick = best_rows(both, w.float(), H["mlp.down_proj"].float())
        errs = [row_errors(q, w.float(), H["mlp.down_proj"].float()) for q in (*both, on)]
        assert (errs[2] <= torch.minimum(errs[0], errs[1])).all()  # never worse than either search, row by row
        alone = fn(w, H["mlp.down_proj"], spec, QuantConfig(clip=True, clip_both=False), "down")
        assert torch.equal(alone.intweight, both[0].intweight)  # clip_both off: the weighted search alone
    else:
        want = rtn_quantize(w, spec, ClipSearch())
    assert torch.equal(on.scales, want.scales) and torch.equal(on.intweight, want.intweight)
    assert not torch.equal(on.scales, off.scales)


@pytest.mark.parametrize("bits,gs", [(3, 32), (2, 64), (4, 24)])
def test_reached_group_params_see_the_updated_columns(real_activations, bits, gs):
    """Static groups set when the solve reaches them: with an identity Hessian there are no updates,
    so they equal groups fixed up front; with lazy column blocks they equal a column-at-a-time solve
    (whose remaining columns are always up to date); groups stay contiguous either way."""
    layer, H, _ = real_activations
    w = layer.get_submodule("mlp.down_proj").weight[:64]
    spec = ModuleSpec(bits, gs, False)
    kw = dict(act_order=True, static_groups=True, clip=ClipSearch())
    eye = torch.eye(w.shape[1]) + torch.diag(torch.rand(w.shape[1]))  # an order, but no error feedback
    a = gptq_quantize(w, eye, spec, group_params="reached", **kw)
    b = gptq_quantize(w, eye, spec, group_params="original", **kw)
    assert torch.equal(a.intweight, b.intweight) and torch.equal(a.scales, b.scales)
    lazy = gptq_quantize(w, H["mlp.down_proj"], spec, group_params="reached", block_size=128, **kw)
    step = gptq_quantize(w, H["mlp.down_proj"], spec, group_params="reached", block_size=1, **kw)
    assert (lazy.intweight != step.intweight).float().mean() < 2e-3  # float-level differences only
    assert torch.allclose(lazy.scales, step.scales, rtol=1e-2)
    in_f = w.shape[1]
    assert torch.equal(lazy.g_idx.long(), torch.arange(in_f) // gs)
    orig = gptq_quantize(w, H["mlp.down_proj"], spec, group_params="original", **kw)
    assert not torch.equal(lazy.scales, orig.scales)  # it is another grid


def test_auto_group_params_follow_the_width():
    from quant.config import ConfigError, QuantConfig

    cfg = QuantConfig()
    assert cfg.group_params == "auto"
    assert [cfg.group_params_for(b) for b in (2, 3, 4, 8)] == ["reached", "reached", "original", "original"]
    assert QuantConfig(group_params="original").group_params_for(2) == "original"
    with pytest.raises(ConfigError, match="group_params"):
        QuantConfig(group_params="late")
