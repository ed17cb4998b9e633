"""Perplexity by the standard protocol (GPTQ, SparseGPT, AWQ papers): concatenate the test text,
tokenize once, cut it into non-overlapping windows of ``seqlen`` tokens, and take
``exp(mean NLL)`` over every predicted token."""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .qlinear import dequantized_cache


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
               device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """``ids`` (n,) token stream -> {"ppl", "nll", "tokens", "windows", "seqlen", "seconds"}."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings={limit}: use a smaller --seqlen.")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    t0 = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    cache = dequantized_cache(model) if torch.device(device).type == "cpu" else contextlib.nullcontext()
    with cache:
        for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, unit="window"):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)  # (1, seqlen)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (seqlen-1, vocab)
            nll = F.cross_entropy(logits, x[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += seqlen - 1
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": n_windows, "seqlen": seqlen,
            "seconds": time.perf_counter() - t0}
