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
from tqdm.auto import tqdm

from .qlinear import dequantized_cache


def kl_terms(logp: torch.Tensor, ref_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, KL(ref ‖ model) in nats and whether the two agree on the most likely token.
    ``logp``, ``ref_logp``: (tokens, vocab) log-probabilities."""
    ref = ref_logp.float()
    kl = (ref.exp() * (ref - logp.float())).sum(-1)  # (tokens,)
    return kl.clamp_min(0.0), logp.argmax(-1) == ref.argmax(-1)


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
               reference: list[torch.Tensor] | None = None, _collect: list | None = None) -> dict:
    """``ids`` (n,) token stream -> {"ppl", "nll", "tokens", "windows", "seqlen", "seconds"}; with
    ``reference`` (from ``reference_logprobs`` on the same ids and windows) also "kl" (mean
    KL(reference ‖ model) per token, nats), "kl_p99" and "top1" (share of tokens whose argmax agrees)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings={limit}: use a smaller --seqlen.")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if reference is not None and len(reference) < n_windows:
        raise ValueError(f"the reference holds {len(reference)} windows but {n_windows} are evaluated: build it "
                         "with the same ids, seqlen and max_windows.")
    t0 = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    kls, agree = [], 0
    cache = dequantized_cache(model) if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with cache:
        for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, unit="window"):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)  # (1, seqlen)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (seqlen-1, vocab)
            logp = F.log_softmax(logits, -1)  # (seqlen-1, vocab), what cross-entropy and KL both read
            total_nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            total_tokens += seqlen - 1
            if _collect is not None:
                _collect.append(logp.to("cpu", torch.float16))
            if reference is not None:
                kl, same = kl_terms(logp, reference[w].to(logp.device))
                kls.append(kl.cpu())
                agree += int(same.sum())
    mean = total_nll / total_tokens
    res = {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": n_windows, "seqlen": seqlen,
           "seconds": time.perf_counter() - t0}
    if reference is not None:
        kl = torch.cat(kls)
        res.update(kl=float(kl.mean()), kl_p99=float(kl.quantile(0.99)) if kl.numel() <= 1 << 24 else float("nan"),
                   top1=agree / total_tokens)
    return res
