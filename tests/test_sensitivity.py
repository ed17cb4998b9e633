"""Sensitivity measurement on a tiny model: its numbers against independent recomputation, its file
form, and its refusal of another model."""
import math

import numpy as np
import pytest
import torch

from calibration.sensitivity import Sensitivity, SensitivityError
from calibration.units import build_units, parse_candidates
from calibration.measure import measure_sensitivity
from quant.arch import get_arch
from quant.config import ConfigError, ModuleSpec, QuantConfig
from quant.quantizer import ClipSearch, rtn_quantize

from .conftest import build_tiny, windows

CLIP = ClipSearch() if QuantConfig().clip else None  # the measurement quantizes as the default config does


@pytest.fixture(scope="module")
def measured():
    model = build_tiny("llama")
    arch = get_arch("llama")
    cands = parse_candidates([2, 4], 32)
    sens = measure_sensitivity(model, arch, windows(4, 32), windows(2, 32, seed=5), cands, QuantConfig(method="rtn"),
                               torch.device("cpu"), model_name="tiny", max_probes=4, pair_bits=2, pair_window=1,
                               progress=False, context_bits=2)
    return model, arch, sens


def test_units_fuse_what_engines_fuse(measured):
    model, arch, sens = measured
    names = [u.name for u in sens.units]
    assert names[:4] == ["model.layers.0.self_attn.q+k+v", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate+up", "model.layers.0.mlp.down_proj"]
    qkv = sens.units[0]
    assert qkv.out_features == 64 + 32 + 32 and qkv.in_features == 64
    assert len(build_units(model, arch, "linear")) == 14


def test_errors_match_independent_recomputation(measured):
    model, arch, sens = measured
    k = 3  # layer 0 down_proj, candidate w2g32
    u = sens.units[k]
    W = model.get_submodule(u.members[0]).weight.detach()
    dW = rtn_quantize(W, ModuleSpec(2, 32), CLIP).dequantize() - W
    assert sens.sqnorm[k][0] == pytest.approx(float(dW.pow(2).sum()), rel=1e-5)
    # H_x from a plain hook on the fp model
    X = []
    h = model.get_submodule(u.members[0]).register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows(4, 32))
    h.remove()
    X = torch.cat(X)
    H = 2 * X.T @ X / X.shape[0]
    assert sens.out_err[k][0] == pytest.approx(float(torch.trace(dW @ H @ dW.T)), rel=1e-4)
    assert sens.hx_trace[k] == pytest.approx(float(H.trace()), rel=1e-5)
    assert sens.cost[k][2] == 128 * 64 * 2  # keep: fp16
    assert sens.cost[k][0] == (64 * 128 * 2 + 4 * 64 * (16 + 2)) / 8  # 2-bit codes + scales + zeros, 4 groups


def test_loss_deltas_match_a_full_forward(measured):
    """The single and pair loss increases (which skip the unchanged early layers) equal a plain full
    forward of a copy of the model with those units quantized."""
    model, arch, sens = measured
    ids = windows(2, 32, seed=5)

    def loss_with(units):
        m = build_tiny("llama")
        for k in units:
            for name in sens.units[k].members:
                lin = m.get_submodule(name)
                lin.weight.data = rtn_quantize(lin.weight.data, ModuleSpec(2, 32), CLIP).dequantize()
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    base = loss_with([])
    assert sens.base_loss == pytest.approx(base, abs=1e-5)
    for k in (1, 6):  # layer 0 o_proj, layer 1 gate/up
        assert sens.single[k] == pytest.approx(loss_with([k]) - base, abs=1e-5)
        assert sens.single_all[k][0] == sens.single[k]

    def loss_at(k, bits):  # the measurement holds quantized weights in fp16 until it uses them
        m = build_tiny("llama")
        for name in sens.units[k].members:
            lin = m.get_submodule(name)
            lin.weight.data = rtn_quantize(lin.weight.data, ModuleSpec(bits, 32), CLIP).dequantize().half().float()
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    # single-unit increases are ~1e-3 here: 1e-6 is tight enough to catch a 1% error
    for k, c, bits in ((5, 1, 4), (6, 1, 4), (1, 0, 2), (6, 0, 2)):
        assert sens.single_all[k][c] == pytest.approx(loss_at(k, bits) - base, abs=1e-6), (k, bits)
    pairs = {(i, j): v for i, j, v in sens.pairs}
    assert (2, 7) in pairs and pairs[(2, 7)] == pytest.approx(loss_with([2, 7]) - base, abs=1e-5)
    assert len(pairs) == 6 + 6 + 16  # within both layers, and across the two neighbouring layers


def test_tables_follow_their_formulas(measured):
    _, _, sens = measured
    D, P = sens.tables("trace", pairs=False)
    tr3 = max(sens.trace[3], sens.trace_se[3])  # layer 0 down_proj: one member
    assert D[3, 0] == pytest.approx(0.5 * tr3 / sens.units[3].params * sens.sqnorm[3][0])
    assert D[3, 2] == 0.0 and not P
    Dh, Ph = sens.tables("hessian")
    M = np.array([[np.nan if v is None else v for v in row] for row in sens.single_all], dtype=float)
    assert np.isfinite(M[:, :2]).all() and np.isnan(M[:, 2]).all()  # measured at 2 and 4 bits, not for keep
    # each width's column is calibrated to the summed measured single-unit losses
    raw = sens.tables("hessian", pairs=False)
    sens_uncal = Sensitivity(**{**sens.__dict__, "single_all": None})
    Du, _ = sens_uncal.tables("hessian", pairs=False)
    for c in (0, 1):
        assert Dh[:, c].sum() == pytest.approx(np.maximum(M[:, c], 0).sum(), rel=1e-6)
        assert np.allclose(raw[0][:, c] / Du[:, c], raw[0][0, c] / Du[0, c])  # one scale per width
    assert Du[3, 0] == pytest.approx(0.5 * tr3 / 64 * sens.out_err[3][0] / sens.hx_trace[3])
    Dm, _ = sens.tables("measured", pairs=False)
    assert np.allclose(Dm[:, :2], np.maximum(M[:, :2], 0)) and (Dm[:, 2] == 0).all()
    # a fused unit sums its members, each with its own trace and rows
    qkv = sens.units[0]
    assert qkv.member_out == (64, 32, 32)
    assert sum(sens.member_out_err[0][0]) == pytest.approx(sens.out_err[0][0], rel=1e-5)
    assert sum(sens.member_trace[0]) == pytest.approx(sens.trace[0], rel=1e-5)
    expect = sum(0.5 * max(t, se) / d * e / sens.hx_trace[0] for t, se, d, e in
                 zip(sens.member_trace[0], sens.member_trace_se[0], qkv.member_out, sens.member_out_err[0][0]))
    assert Du[0, 0] == pytest.approx(expect)
    # the pair term reproduces the measured interaction at the measured width, and vanishes when kept
    # (negative interactions, mostly noise, are not credited)
    for i, j, lij in sens.pairs:
        assert Ph[(i, j)][0, 0] == pytest.approx(max(0.0, lij - sens.single[i] - sens.single[j]))
        assert Ph[(i, j)][2, 0] == 0.0 and Ph[(i, j)][0, 2] == 0.0 and (Ph[(i, j)] >= 0).all()
    # the measured objective shares the pair terms, scaled by the second-order model: a unit whose
    # measured single is ≤ 0 must not blow them up
    noisy = Sensitivity(**{**sens.__dict__, "single_all": [list(r) for r in sens.single_all]})
    i, j, _ = sens.pairs[0]
    noisy.single_all[i][1] = -1e-3  # 4 bits: measured below zero (noise)
    for obj_sens in (sens, noisy):
        _, Pm = obj_sens.tables("measured")
        _, Ph2 = obj_sens.tables("hessian")
        assert Pm.keys() == Ph2.keys() and all(np.allclose(Pm[k], Ph2[k]) for k in Pm)
        assert all(np.isfinite(v).all() and v.max() < 10 * max(1e-9, max(p[2] for p in sens.pairs)) for v in Pm.values())
    Do, _ = sens.tables("output")
    ratio = Do[:, 0] / np.asarray(sens.out_err)[:, 0]
    assert np.allclose(ratio, ratio[0])  # one global scale: the ranking is the output error's
    with pytest.raises(Exception, match="unknown objective"):
        sens.tables("nonsense")


def _tiny_loss(units, bits, ids) -> float:
    """Loss of a fresh tiny model with unit k's linears rounded (RTN, group 32, via fp16) to bits[k] (16: fp)."""
    m = build_tiny("llama")
    for u, b in zip(units, bits):
        for name in u.members:
            lin = m.get_submodule(name)
            if b != 16:
                lin.weight.data = rtn_quantize(lin.weight.data, ModuleSpec(b, 32), CLIP).dequantize().half().float()
    with torch.no_grad():
        return float(m(input_ids=ids, labels=ids).loss)


def test_in_context_losses_match_a_full_forward(measured):
    """``context_bits=2``: each unit's loss change when it alone leaves the all-2-bit model equals a
    plain forward of such a copy, and the ``context`` objective is exact at those configurations."""
    from calibration.mixed import make_problem

    model, arch, sens = measured
    ids = windows(2, 32, seed=5)

    def loss_with(bits_of):  # unit -> bits (16: fp), the rest at 2 bits
        return _tiny_loss(sens.units, [bits_of.get(k, 2) for k in range(len(sens.units))], ids)

    ctx = loss_with({})
    assert sens.context == "w2g32"
    assert sens.context_dloss == pytest.approx(ctx - sens.base_loss, abs=1e-5)
    problem = make_problem(sens, "context", gain_scale=1.0)  # gains as measured: exact at single moves
    assert not problem.pairs
    assert problem.objective([0] * len(sens.units)) == pytest.approx(ctx - sens.base_loss, abs=1e-5)
    for k, c, bits in ((1, 1, 4), (6, 2, 16), (3, 1, 4)):
        assert sens.context_single[k][0] == 0.0
        assert sens.context_single[k][c] == pytest.approx(loss_with({k: bits}) - ctx, abs=1e-5), (k, bits)
        choice = [0] * len(sens.units)
        choice[k] = c
        assert problem.objective(choice) == pytest.approx(loss_with({k: bits}) - sens.base_loss, abs=1e-5)
    # wider is better in context, and the table keeps the sign the ILP needs
    D, _ = sens.tables("context")
    assert (D[:, 2] < 0).sum() > len(sens.units) // 2
    # in-context widths do not add fp-frame singles the user did not ask for
    only2 = measure_sensitivity(model, arch, windows(4, 32), ids, parse_candidates([2, 4], 32), QuantConfig(method="rtn"),
                                torch.device("cpu"), max_probes=1, pair_bits=None, single_bits=(2,), context_bits=2,
                                progress=False)
    assert all(row[1] is None and row[0] is not None for row in only2.single_all)
    assert all(row[1] is not None and row[2] is not None for row in only2.context_single)
    assert only2.settings["single_bits"] == [2]
    # gains (negative changes) count at gain_scale, damages in full
    full, half = sens.tables("context", gain_scale=1.0)[0], sens.tables("context", gain_scale=0.5)[0]
    assert (full < 0).any() and (full > 0).any()
    assert np.array_equal(half, np.where(full < 0, 0.5 * full, full))
    assert np.array_equal(sens.tables("context")[0], half)  # the default
    with pytest.raises(Exception, match="gain-scale"):
        sens.tables("context", gain_scale=0.0)
    no_ctx = Sensitivity(**{**sens.__dict__, "context_single": None})
    with pytest.raises(Exception, match="--context-bits"):
        no_ctx.tables("context")


def test_taylor_in_context_tracks_the_exact_passes(measured):
    """``context_method="taylor"``: the widths it measures by a pass equal the exact method's, and
    the ones it predicts (gradient at the all-2-bit model plus a curvature fitted per unit) follow
    the exact passes closely; measuring every width leaves nothing to predict."""
    model, arch, exact = measured  # candidates w2g32 (context), w4g32, fp16
    args = (model, arch, windows(4, 32), windows(2, 32, seed=5), exact.candidates, QuantConfig(method="rtn"),
            torch.device("cpu"))
    kw = dict(max_probes=1, pair_bits=None, single_bits=(), progress=False, context_bits=2, context_method="taylor")
    taylor = measure_sensitivity(*args, **kw)
    E = np.array(exact.context_single, dtype=float)
    T = np.array(taylor.context_single, dtype=float)
    X = np.array([[np.nan if v is None else v for v in row] for row in taylor.context_exact])
    assert np.isnan(X[:, 1]).all() and np.allclose(X[:, 2], E[:, 2], atol=1e-6)  # fp16 measured, w4 predicted
    assert np.allclose(T[:, 2], E[:, 2], atol=1e-6) and (T[:, 0] == 0).all()
    assert not np.allclose(T[:, 1], E[:, 1], atol=1e-6)  # a prediction, not a pass
    assert np.corrcoef(T[:, 1], E[:, 1])[0, 1] > 0.95
    # 4% here; the gradient term alone (no fitted curvature) is off by 20%
    assert np.abs(T[:, 1] - E[:, 1]).mean() < 0.1 * np.abs(E[:, 1]).mean()
    assert taylor.context_dloss == pytest.approx(exact.context_dloss, abs=1e-6)
    assert taylor.settings["context_method"] == "taylor" and taylor.settings["context_exact_bits"] == [16]
    every = measure_sensitivity(*args, **{**kw, "context_exact_bits": (4, 16)})
    assert np.allclose(np.array(every.context_single, dtype=float), E, atol=1e-6)
    # one pass per width, at its default group: w4g16 is predicted with the curvature fitted at w4g32
    more = parse_candidates([2, 4, "4g16"], 32)
    assert [c.label for c in more] == ["w2g32", "w4g32", "w4g16", "fp16"]
    extra = measure_sensitivity(*args[:4], more, *args[5:], **{**kw, "context_exact_bits": (4, 16)})
    assert [row[2] is None and row[1] is not None for row in extra.context_exact] == [True] * len(extra.units)
    assert np.allclose(np.array(extra.context_single, dtype=float)[:, [0, 1, 3]], E, atol=1e-6)
    with pytest.raises(Exception, match="context method"):
        measure_sensitivity(*args, **{**kw, "context_method": "guess"})


def test_in_context_around_a_mixed_anchor(measured):
    """``context_anchor``: the changes are measured around any allocation (here units at 2, 4 and 16
    bits), exactly by a full forward, and the Taylor method tracks them (a unit anchored at fp16 has
    its curvature fitted at the 4-bit pass instead)."""
    from calibration.mixed import make_problem

    model, arch, sens = measured
    ids = windows(2, 32, seed=5)
    labels = ["w2g32", "w4g32", "fp16"]
    anchor = [labels[k % 3] for k in range(len(sens.units))]
    bits = {"w2g32": 2, "w4g32": 4, "fp16": 16}

    def loss_with(change):  # unit -> label, the rest at the anchor
        return _tiny_loss(sens.units, [bits[change.get(k, anchor[k])] for k in range(len(sens.units))], ids)

    args = (model, arch, windows(4, 32), ids, sens.candidates, QuantConfig(method="rtn"), torch.device("cpu"))
    kw = dict(max_probes=1, pair_bits=None, single_bits=(), progress=False, context_anchor=anchor)
    exact = measure_sensitivity(*args, **kw)
    at = loss_with({})
    assert exact.context == "mixed" and exact.context_anchor == anchor
    assert exact.context_dloss == pytest.approx(at - exact.base_loss, abs=1e-5)
    for k, lab in ((0, "w4g32"), (1, "fp16"), (2, "w2g32"), (5, "w2g32")):
        c = labels.index(lab)
        assert exact.context_single[k][labels.index(anchor[k])] == 0.0
        assert exact.context_single[k][c] == pytest.approx(loss_with({k: lab}) - at, abs=1e-5), (k, lab)
    problem = make_problem(exact, "context", gain_scale=1.0)
    start = [labels.index(lab) for lab in anchor]
    assert problem.objective(start) == pytest.approx(at - exact.base_loss, abs=1e-5)
    taylor = measure_sensitivity(*args, **{**kw, "context_method": "taylor"})
    E = np.array(exact.context_single, dtype=float)
    T = np.array(taylor.context_single, dtype=float)
    X = np.array([[np.nan if v is None else v for v in row] for row in taylor.context_exact])
    for k in range(len(anchor)):  # passes: fp16, or w4 for the units anchored at fp16
        measured_c = labels.index("w4g32" if anchor[k] == "fp16" else "fp16")
        assert np.isfinite(X[k, measured_c]) and X[k, measured_c] == pytest.approx(E[k, measured_c], abs=1e-6)
        assert np.isnan(X[k, [c for c in range(3) if c not in (measured_c, start[k])]]).all()
    moved = ~np.isfinite(X) & (T != 0)
    assert np.corrcoef(T[moved], E[moved])[0, 1] > 0.95
    with pytest.raises(Exception, match="one of the candidates"):
        measure_sensitivity(*args, **{**kw, "context_anchor": anchor[:-1]})
    with pytest.raises(Exception, match="not both"):
        measure_sensitivity(*args, **{**kw, "context_bits": 2})


def test_sequential_anchor_is_the_model_quantize_builds():
    """``sequential=True``: each layer's candidates are quantized (GPTQ) on the anchor model's inputs,
    so the anchor whose loss the context measurement starts from is the model `quantize` builds
    (one pass per layer); on fp inputs it is another model, with another loss."""
    from quant.pipeline import quantize_model

    arch = get_arch("llama")
    calib, ids = windows(4, 32), windows(2, 32, seed=5)
    # min/max: far apart; natural column order, since a Hessian order amplifies the float-level
    # differences between the two passes' Hessians (ties in diag(H) may break the other way)
    config = QuantConfig(method="gptq", bits=2, group_size=-1, true_sequential=False, clip=False, act_order=False)
    built = build_tiny("llama")
    quantize_model(built, arch, calib, config, torch.device("cpu"), progress=False)
    with torch.no_grad():
        quantized = float(built(input_ids=ids, labels=ids).loss)
    kw = dict(max_probes=1, pair_bits=None, single_bits=(), progress=False, context_bits=2)
    dl = {}
    for seq in (True, False):
        sens = measure_sensitivity(build_tiny("llama"), arch, calib, ids, parse_candidates([2], -1), config,
                                   torch.device("cpu"), **kw, sequential=seq)
        dl[seq] = sens.context_dloss + sens.base_loss
        assert sens.settings["sequential"] is seq
    assert dl[True] == pytest.approx(quantized, abs=2e-3)
    assert abs(dl[False] - quantized) > 10 * abs(dl[True] - quantized)
    with pytest.raises(ConfigError, match="anchor"):  # without an anchor there is nothing to be sequential on
        measure_sensitivity(build_tiny("llama"), arch, calib, ids, parse_candidates([2], -1), config,
                            torch.device("cpu"), **{**kw, "context_bits": None}, sequential=True)


def test_file_round_trip_and_model_check(measured, tmp_path):
    model, arch, sens = measured
    path = sens.save(tmp_path / "m.sens")
    back = Sensitivity.load(path)
    assert back.units == sens.units and back.candidates == sens.candidates
    assert back.tables("hessian")[0].tolist() == sens.tables("hessian")[0].tolist()
    back.check_model(model, arch)  # same model: accepted
    with pytest.raises(SensitivityError, match="not on this model"):
        back.check_model(build_tiny("llama", seed=1), arch)
    with pytest.raises(SensitivityError, match="not on this model"):
        back.check_model(build_tiny("llama", num_hidden_layers=3), arch)
    (tmp_path / "bad.sens").write_text("{not json")
    with pytest.raises(SensitivityError, match="not an hmq sensitivity file"):
        Sensitivity.load(tmp_path / "bad.sens")
    with pytest.raises(SensitivityError, match="hmq measure"):
        Sensitivity.load(tmp_path / "missing.sens")
    assert math.isfinite(back.base_loss)
