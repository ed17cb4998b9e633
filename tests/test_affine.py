"""AffineQuant-style transforms: exact equivalence when folded, invertibility, and lower block error
than plain RTN at 2 bits."""
import copy
import dataclasses

import pytest
import torch

from quant.capture import capture_layer_inputs, collect_hessians, run_layer
from quant import affine
from quant.arch import get_arch
from quant.config import ConfigError, ModuleSpec, QuantConfig
from quant.export import save_quantized
from quant.loading import load_quantized
from quant.pipeline import quantize_model
from quant.gptq import gptq_quantize
from quant.methods import clip_search
from quant.quantizer import best_rows, compute_qparams, row_errors, rtn_quantize, search_qparams

from .conftest import build_tiny, windows

CPU = torch.device("cpu")


def random_transforms(layer, heads, seed):
    g = torch.Generator().manual_seed(seed)
    T = affine.BlockTransforms(layer, heads, {})
    with torch.no_grad():
        for p in (T.log_s_attn, T.log_s_mlp, T.log_s_down):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        T.A.add_(torch.randn(T.A.shape, generator=g) * 0.2)
        T.project(heads.head_dim)
    return T


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v biases; both use 4 heads on 2 KV heads
def test_folding_leaves_the_model_unchanged(model_type):
    model = build_tiny(model_type)
    with torch.no_grad():  # non-trivial norms and biases, so the folds are really exercised
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    x = windows(2, 32, seed=1)
    ref = model(x).logits
    heads = affine.Heads.of(model.config)
    assert (heads.n_heads, heads.n_kv) == (4, 2)
    for i, layer in enumerate(model.model.layers):
        affine.fold(layer, random_transforms(layer, heads, i), name=f"layer {i}")
    assert not torch.equal(model.model.layers[0].self_attn.v_proj.weight, build_tiny(model_type).model.layers[0].self_attn.v_proj.weight)
    assert torch.allclose(model(x).logits, ref, atol=1e-4, rtol=0)


def test_projection_keeps_matrices_strictly_diagonally_dominant():
    layer = build_tiny("llama").model.layers[0]
    heads = affine.Heads.of(build_tiny("llama").config)
    T = affine.BlockTransforms(layer, heads, {})
    with torch.no_grad():
        T.A.add_(torch.randn(T.A.shape) * 3)
    T.project(width=2)
    A = T.A.detach()
    idx = torch.arange(heads.head_dim)
    assert (A[:, (idx[:, None] - idx[None, :]).abs() > 2] == 0).all()  # outside the band: masked
    diag = torch.diagonal(A, dim1=1, dim2=2).abs()
    assert (A.abs().sum(-1) - diag < diag).all()
    assert torch.isfinite(torch.linalg.cond(A)).all()


@pytest.fixture(scope="module")
def block_data():
    model = build_tiny("llama")
    arch = get_arch("llama")
    inputs = capture_layer_inputs(model, model.model.layers, windows(8, 32), CPU, 4)
    layer = model.model.layers[0]
    targets = [o.hidden for o in run_layer(layer, inputs)]
    return model, layer, inputs, targets, arch


def _rtn_block_error(layer, inputs, targets, spec):
    q = copy.deepcopy(layer)
    for n in affine.LINEARS:
        lin = q.get_submodule(n)
        lin.weight.data = rtn_quantize(lin.weight.data, spec).dequantize()
    outs = [o.hidden for o in run_layer(q, inputs)]
    return sum(float((o - t).pow(2).mean()) for o, t in zip(outs, targets)) / len(outs)


def test_affine_lowers_block_error_against_rtn_at_2_bits(block_data):
    model, layer, inputs, targets, _ = block_data
    spec = ModuleSpec(2, 32, False)
    specs = {n: spec for n in affine.LINEARS}
    heads = affine.Heads.of(model.config)
    T, info = affine.learn_block(layer, heads, specs, inputs, targets, affine.AffineSettings(epochs=6, lr=1e-2, clip_lr=2e-2))
    assert info["loss"][-1] < info["loss"][0]
    A = T.A.detach()
    diag = torch.diagonal(A, dim1=1, dim2=2).abs()
    assert (A.abs().sum(-1) - diag < diag).all()  # still invertible
    plain = _rtn_block_error(layer, inputs, targets, spec)
    learned = copy.deepcopy(layer)
    affine.fold(learned, T)
    affine.clamp_to_clip(learned, T, specs)
    after = _rtn_block_error(learned, inputs, targets, spec)
    print(f"block MSE at 2 bits: RTN {plain:.4g}, affine + RTN {after:.4g}")
    assert after < 0.9 * plain  # deterministic; on random tiny weights the gain is ~20%


def test_ill_conditioned_transform_names_the_block(block_data):
    model, layer, *_ = block_data
    heads = affine.Heads.of(model.config)
    T = affine.BlockTransforms(layer, heads, {})
    with torch.no_grad():
        T.A[1, 0, 0] = 1e-7
    with pytest.raises(affine.AffineError, match=r"layer 7: .*key/value head 1 is ill-conditioned.*--affine-lr"):
        affine.fold(copy.deepcopy(layer), T, name="layer 7")


@pytest.mark.parametrize("method", ["affine", "affine+gptq"])
def test_pipeline_runs_affine_methods_and_checkpoints_reload(method, tmp_path):
    model = build_tiny("llama")
    cfg = QuantConfig(method=method, bits=3, group_size=32, affine_epochs=2)
    report = quantize_model(model, get_arch("llama"), windows(4, 32), cfg, CPU, progress=False)
    assert len(report.affine_loss) == 2 and all(len(v) == 2 for v in report.affine_loss)
    x = windows(2, 32, seed=3)
    out = save_quantized(model, None, tmp_path / "ck", cfg, save_dtype=torch.float32)
    assert torch.equal(load_quantized(out)(x).logits, model(x).logits)


def test_cli_quantizes_with_affine_gptq_and_evaluates(tiny_model_dir, text_file, tmp_path, capsys):
    import json

    import cli

    from .test_cli import quantize_args

    out = tmp_path / "aff"
    assert cli.main([str(a) for a in quantize_args(tiny_model_dir, text_file, out, "--bits", 3, "--method", "affine+gptq",
                                                   "--affine-epochs", 2, "--affine-lr", 0.01)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["meta"]["hmq_method"] == "affine+gptq" and cfg["bits"] == 3
    assert json.loads((out / "hmq.json").read_text())["quant_config"]["affine_epochs"] == 2
    assert cli.main(["eval", "--model", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2",
                     "--no-progress"]) == 0
    assert cli.main(["measure", "--model", str(tiny_model_dir), "--method", "affine", "--calib", str(text_file),
                     "--out", str(tmp_path / "m.sens")]) == 2
    assert "measure with --method gptq or rtn" in capsys.readouterr().err


def test_gptq_on_a_fixed_grid():
    """With a given grid GPTQ only decides the rounding: on H = I that is RTN on the grid; on a real H
    it has lower output error than RTN on the same grid, and the stored scales are the grid's."""
    from quant.quantizer import quantize_codes

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    spec = ModuleSpec(3, 32, False)
    grid = [compute_qparams(W[:, c : c + 32] * 0.8, 3, False) for c in (0, 32)]  # a clipped grid
    rtn_codes = torch.cat([quantize_codes(W[:, c : c + 32], *grid[k], 3) for k, c in enumerate((0, 32))], 1)
    qw = gptq_quantize(W, torch.eye(64), spec, grid=grid)
    assert torch.equal(qw.intweight.float(), rtn_codes) and torch.equal(qw.scales[1], grid[1][0])
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = 2 * X.T @ X / 256
    q2 = gptq_quantize(W, H, spec, grid=grid)
    rtn = grid_dequantize(rtn_codes, grid)
    err = lambda d: float(torch.trace(d @ H @ d.T))  # noqa: E731
    assert err(q2.dequantize() - W) < 0.8 * err(rtn - W)
    with pytest.raises(ValueError, match="grid of 2 groups does not fit"):
        gptq_quantize(W, H, ModuleSpec(3, 16, False), grid=grid)


def grid_dequantize(codes, grid):
    scales = torch.stack([s for s, _ in grid])
    zeros = torch.stack([z for _, z in grid])
    g = torch.arange(codes.shape[1]) // 32
    return (codes - zeros[g].T) * scales[g].T


@pytest.mark.parametrize("method", ["affine", "affine+gptq"])
def test_pipeline_quantizes_on_the_learned_grid(method):
    """Layer 0 through the pipeline equals the steps by hand: learn, fold, then RTN on the clamped
    weights (affine) or GPTQ's scales being the learned grid (affine+gptq)."""
    from quant.pipeline import module_specs

    arch = get_arch("llama")
    w = windows(4, 32)
    # natural column order, so GPTQ's own first group is the one that sees no error feedback; every
    # linear's Hessian from the layer's unquantized pass, so the test can rebuild its energies
    cfg = QuantConfig(method=method, bits=3, group_size=32, affine_epochs=2, act_order=False, true_sequential=False)
    model = build_tiny("llama")
    quantize_model(model, arch, w, cfg, CPU, batch_size=4, progress=False)
    ref = build_tiny("llama")
    inputs = capture_layer_inputs(ref, ref.model.layers, w, CPU, 4)
    layer = ref.model.layers[0]
    targets = [o.hidden for o in run_layer(layer, inputs)]
    specs = {n.removeprefix("model.layers.0."): s for n, s in module_specs(ref, arch, cfg).items()
             if n.startswith("model.layers.0.")}
    T, _ = affine.learn_block(layer, affine.Heads.of(ref.config), specs, inputs, targets,
                              affine.AffineSettings(epochs=2, lr=cfg.affine_lr, clip_lr=2 * cfg.affine_lr))
    affine.fold(layer, T)
    if method == "affine":
        affine.clamp_to_clip(layer, T, specs)
        for n in ("self_attn.v_proj", "mlp.down_proj"):
            expect = rtn_quantize(layer.get_submodule(n).weight, specs[n]).dequantize()
            assert torch.equal(model.model.layers[0].get_submodule(n).dequantize(), expect), n
    else:
        grids = affine.learned_grid(layer, T, specs)
        names = ["self_attn.v_proj", "mlp.down_proj"]
        H, _ = collect_hessians(layer, names, inputs)  # the folded layer's input energies
        clip = clip_search(cfg, 3)  # the range search as the method configures it
        for n in names:  # each row on the learned grid or GPTQ's own
            learned = torch.stack([s for s, _ in grids[n]]).half()
            w = layer.get_submodule(n).weight.float()
            # GPTQ's own first group (later ones see its feedback), its range searched as configured:
            # each row from the weighted or the unweighted search's solve (clip_both)
            own0 = [search_qparams(w[:, :32], 3, False, dataclasses.replace(clip, weighted=weighted),
                                   H[n].diagonal()[:32])[0].half() for weighted in (True, False)]
            got = model.model.layers[0].get_submodule(n).scales
            on_learned = (got == learned).all(0)
            assert bool((on_learned | (got[0] == own0[0]) | (got[0] == own0[1])).all()), n
            assert bool(on_learned.any()), n  # the learned clipping is used somewhere


def test_best_rows_takes_each_rows_lower_output_error():
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    W[::2, 0] = 8.0  # outliers on an input that barely matters: clipping them pays in those rows
    X = torch.randn(256, 64) * torch.linspace(0.01, 3, 64)
    H = 2 * X.T @ X / 256
    spec = ModuleSpec(3, 32, False)
    grid = [compute_qparams(W[:, c : c + 32] * 0.7, 3, False) for c in (0, 32)]
    own, learned = gptq_quantize(W, H, spec), gptq_quantize(W, H, spec, grid=grid)
    best, pick = best_rows([own, learned], W, H)
    e_own, e_learned, e_best = (row_errors(q, W, H) for q in (own, learned, best))
    assert torch.allclose(e_best, torch.minimum(e_own, e_learned))
    assert 0 < int(pick.sum()) < 16  # both options win somewhere on this problem
    for r in range(16):
        src = learned if pick[r] else own
        assert torch.equal(best.intweight[r], src.intweight[r]) and torch.equal(best.scales[:, r], src.scales[:, r])
        assert torch.equal(best.zeros[:, r], src.zeros[:, r])
    with pytest.raises(ValueError, match="same bits"):
        best_rows([own, gptq_quantize(W, H, ModuleSpec(4, 32, False))], W, H)


def test_a_step_averages_its_batches(block_data):
    """Each optimizer step takes the mean gradient of its batches: two copies of the first batch in
    one step, then the second batch alone (a last, shorter step), learn exactly what one batch a
    step learns on the two batches."""
    model, layer, inputs, targets, _ = block_data
    specs = {n: ModuleSpec(3, 32, False) for n in affine.LINEARS}
    heads = affine.Heads.of(model.config)
    x, y = inputs[:2], targets[:2]
    plain, _ = affine.learn_block(layer, heads, specs, x, y, affine.AffineSettings(epochs=2, batch_size=1))
    paired, _ = affine.learn_block(layer, heads, specs, [x[0], *x], [y[0], *y], affine.AffineSettings(epochs=2, batch_size=2))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), paired.parameters()))
    with pytest.raises(ConfigError, match="cannot be spread over 2 processes"):
        affine.learn_block(layer, heads, specs, x, y, affine.AffineSettings(batch_size=3), spread=affine.Spread(2, 4))
