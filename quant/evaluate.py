"""Perplexity by the standard protocol (GPTQ, SparseGPT, AWQ papers): concatenate the test text,
tokenize once, cut it into non-overlapping windows of ``seqlen`` tokens, and take
``exp(mean NLL)`` over every predicted token. Beside it, the KL divergence of the model's
next-token distribution from a reference (the fp model's, kept as fp16 log-probabilities per
window) and top-1 agreement, as llama.cpp's ``perplexity --kl-divergence`` reports them."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .capture import run_layer
from .qlinear import dequantized_cache


class EvalError(ValueError):
    """The evaluation cannot run as asked (window too long, too little text); the message says what to do."""


def kl_terms(logp: torch.Tensor, ref_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, KL(ref ‖ model) in nats and whether the two agree on the most likely token.
    ``logp``, ``ref_logp``: (tokens, vocab) log-probabilities."""
    ref = ref_logp.float()
    kl = (ref.exp() * (ref - logp.float())).sum(-1)  # (tokens,)
    return kl.clamp_min(0.0), logp.argmax(-1) == ref.argmax(-1)


def top_k_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``k`` most likely tokens per position and their log-probabilities, from its
    ``logits`` (tokens, vocab): what :func:`top_k_kl` needs, (tokens, k) int32 and float32, instead of
    the whole (tokens, vocab) distribution."""
    logp = torch.log_softmax(logits.float(), -1)
    top, idx = logp.topk(min(k, logp.shape[-1]), -1)  # (tokens, k)
    return idx.to(torch.int32), top


def top_k_kl(logits: torch.Tensor, idx: torch.Tensor, ref_top: torch.Tensor) -> torch.Tensor:
    """Per token, KL(ref ‖ model) in nats with the reference kept as its top ``k`` (:func:`top_k_reference`)
    and the rest of the vocabulary as one more outcome, the "tail": the KL of the two distributions
    coarsened to k + 1 outcomes. Never above the full KL (coarsening loses information, the
    data-processing inequality) and equal to it when k covers the vocabulary or the tail is empty.
    ``logits``: the model's (tokens, vocab)."""
    logq = torch.log_softmax(logits.float(), -1).gather(-1, idx.long())  # (tokens, k)
    p = ref_top.exp()
    head = (p * (ref_top - logq)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0.0)
    q_tail = (1 - logq.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), torch.zeros_like(p_tail))
    return (head + tail).clamp_min(0.0)


def _leading_bos(model: nn.Module, ids: torch.Tensor) -> int | None:
    """The BOS id when the stream starts with the model's BOS token (the tokenizer adds one, as
    Gemma's and Llama's do): then every window starts with it, as the model saw text in training
    (Gemma-3-270M, 8 × 1,024 FOLDOC reporting tokens: perplexity 34.2 with it, 58.3 without)."""
    bos = getattr(model.config, "bos_token_id", None)
    return int(bos) if isinstance(bos, int) and ids.numel() and int(ids[0]) == bos else None


@torch.no_grad()
def reference_logprobs(model: nn.Module, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
                       device: torch.device | str = "cpu", progress: bool = True) -> tuple[list[torch.Tensor], dict]:
    """The reference model's log-probabilities per window, (seqlen-1, vocab) fp16 on the CPU each,
    for ``perplexity(..., reference=...)``, and its own perplexity result from the same pass."""
    out = []
    res = perplexity(model, ids, seqlen, max_windows, device, progress, _collect=out)
    return out, res


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
               device: torch.device | str = "cpu", progress: bool = True,
               reference: list[torch.Tensor] | None = None, _collect: list | None = None, batch_size: int = 8,
               reference_model: nn.Module | None = None) -> dict:
    """``ids`` (n,) token stream -> {"ppl", "nll", "tokens", "windows", "seqlen", "seconds", "window_nll"};
    with ``reference`` (from ``reference_logprobs`` on the same ids and windows) also "kl" (mean
    KL(reference ‖ model) per token, nats), "kl_p99", "top1" (share of tokens whose argmax agrees) and
    "window_kl". "window_nll" and "window_kl" hold each window's mean, in window order, for paired
    comparisons of two models on the same windows (``calibration.select.paired_gain``).
    A stream that starts with the model's BOS token (its tokenizer adds one) is cut into windows of
    ``seqlen - 1`` text tokens, each after a BOS.

    ``reference_model`` (the fp model a checkpoint came from) instead runs beside the model in one
    layer sweep (:func:`quant.engine.lockstep`): no log-probabilities are kept, so KL costs one more
    set of activations whatever the vocabulary; the result then also holds KL percentiles
    (:data:`KL_QUANTILES`) and the reference's own perplexity under "reference".

    The windows go through the layer sweep (:mod:`quant.engine`) ``batch_size`` at a time: one decoder
    layer on ``device`` at a time, so a streamed model is evaluated without ever being in memory whole."""
    if reference is not None and reference_model is not None:
        raise ValueError("pass either reference log-probabilities or a reference model, not both")
    if reference_model is not None:
        mine_, theirs = model.config, reference_model.config
        for what, a, b in (("architecture", mine_.model_type, theirs.model_type),
                           ("vocabulary", model.get_output_embeddings().out_features,
                            reference_model.get_output_embeddings().out_features),
                           ("BOS token", getattr(mine_, "bos_token_id", None), getattr(theirs, "bos_token_id", None))):
            if a != b:
                raise EvalError(f"the reference model's {what} ({b}) is not the model's ({a}): KL compares two "
                                "models of one tokenizer; pass the model the checkpoint was made from as --reference.")
    from .arch import get_arch
    from .engine import head_logits, head_on, lockstep

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise EvalError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings={limit}: use a smaller --seqlen.")
    bos = _leading_bos(model, ids)
    text = ids[1:] if bos is not None else ids
    width = seqlen - 1 if bos is not None else seqlen  # text tokens per window
    n_windows = text.numel() // width
    if n_windows == 0:
        raise EvalError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if reference is not None and dist.world() == 1 and len(reference) < n_windows:
        raise EvalError(f"the reference holds {len(reference)} windows but {n_windows} are evaluated: build it "
                         "with the same ids, seqlen and max_windows.")
    device = torch.device(device)
    arch = get_arch(model.config.model_type)
    t0 = time.perf_counter()
    windows = text[: n_windows * width].view(n_windows, width)  # (windows, seqlen), BOS first where the model wants it
    if bos is not None:
        windows = torch.cat([windows.new_full((n_windows, 1), bos), windows], 1)
    # with several processes each evaluates whole batches (batch b: process b mod world; smaller
    # batches when there are too few for every process), and the per-window results are summed in
    # window order, as one process sums them
    if n_windows < dist.world():
        raise EvalError(f"{n_windows} windows are fewer than the {dist.world()} processes: evaluate more windows or "
                        "run fewer processes.")
    if dist.world() > 1:
        batch_size = max(1, min(batch_size, n_windows // dist.world()))
    mine = [w for w in range(n_windows) if (w // batch_size) % dist.world() == dist.rank()]
    if reference is not None and dist.world() > 1 and len(reference) < len(mine):
        raise EvalError(f"the reference holds {len(reference)} windows but this process evaluates {len(mine)}: build "
                        "it with the same ids, seqlen, max_windows and processes.")

    def step(i, layer, inputs):
        cache = dequantized_cache(layer) if device.type == "cpu" else contextlib.nullcontext()
        with cache:
            return run_layer(layer, inputs)

    models = [model] if reference_model is None else [model, reference_model]
    hidden = lockstep(models, arch, windows[mine], device, step, batch_size=batch_size, keep=False, progress=progress,
                      desc="perplexity" if reference_model is None else "perplexity and KL")
    per_window: dict[int, tuple] = {}  # window -> (summed NLL, per-token KL, agreeing tokens, reference's NLL)
    with head_on(model, arch, device), (head_on(reference_model, arch, device) if reference_model is not None
                                        else contextlib.nullcontext()):
        own = iter(enumerate(mine))  # reference[j] belongs to this process's j-th window
        for batches in zip(*hidden):
            for hs in zip(*(b.hidden for b in batches)):  # (seqlen, hidden) each: one window at a time keeps
                j, w = next(own)                          # (seqlen, vocab) logits small
                x = windows[w].to(device)
                logp = F.log_softmax(head_logits(model, arch, hs[0][None])[0, :-1].float(), -1)  # (seqlen-1, vocab)
                nll, kl, same, ref_nll = logp.gather(1, x[1:, None]).sum().item(), None, 0, None
                if _collect is not None:
                    _collect.append(logp.to("cpu", torch.float16))
                ref = None if reference is None else reference[j].to(logp.device)
                if reference_model is not None:
                    ref = F.log_softmax(head_logits(reference_model, arch, hs[1][None])[0, :-1].float(), -1)
                    ref_nll = ref.gather(1, x[1:, None]).sum().item()
                if ref is not None:
                    kl, agree = kl_terms(logp, ref)
                    kl, same = kl.cpu(), int(agree.sum())
                per_window[w] = (nll, kl, same, ref_nll)
    for part in dist.gather_all(per_window):
        per_window.update(part)
    total_nll, total_tokens = 0.0, 0
    for w in range(n_windows):
        total_nll -= per_window[w][0]
        total_tokens += seqlen - 1
    mean = total_nll / total_tokens
    res = {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": n_windows, "seqlen": seqlen,
           "seconds": time.perf_counter() - t0,
           "window_nll": [-per_window[w][0] / (seqlen - 1) for w in range(n_windows)]}
    if reference is not None or reference_model is not None:
        kl = torch.cat([per_window[w][1] for w in range(n_windows)])
        res.update(kl=float(kl.mean()), top1=sum(per_window[w][2] for w in range(n_windows)) / total_tokens,
                   window_kl=[float(per_window[w][1].double().mean()) for w in range(n_windows)], **kl_quantiles(kl))
    if reference_model is not None:
        ref_mean = -sum(per_window[w][3] for w in range(n_windows)) / total_tokens
        res["reference"] = {"ppl": math.exp(ref_mean), "nll": ref_mean, "tokens": total_tokens, "windows": n_windows,
                            "seqlen": seqlen, "seconds": res["seconds"],  # one sweep for both
                            "window_nll": [-per_window[w][3] / (seqlen - 1) for w in range(n_windows)]}
    return res


KL_QUANTILES = {"kl_median": 0.5, "kl_p90": 0.9, "kl_p99": 0.99, "kl_p999": 0.999, "kl_max": 1.0}


def kl_quantiles(kl: torch.Tensor) -> dict:
    """The per-token KL's percentiles, the ones llama.cpp's ``--kl-divergence`` prints, interpolated
    linearly at ``q·(n-1)`` as ``torch.quantile`` does (sorted here, since that stops at 2**24 elements)."""
    ordered = kl.double().sort().values
    n = ordered.numel()
    out = {}
    for key, q in KL_QUANTILES.items():
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out[key] = float(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))
    return out
