"""The layer sweep: capture the first decoder layer's inputs, then bring one decoder layer at a time
onto the compute device from wherever its weights live (CPU RAM, or the safetensors shards of a
streamed model, see :mod:`quant.stream`), hand it and the stored activations to a stage, and move on
with the activations the stage returns. Stages (quantization, evaluation, ...) are plain callbacks
``step(index, layer, inputs) -> outputs``; none writes its own loop over the layers.

Memory: one decoder layer on the device, the activations of every window (``n × seq × hidden``),
and, for a streamed model, nothing of the other layers' fp weights.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import LayerInput, capture_layer_inputs

from .arch import Arch, decoder_layers
from .stream import STORE_ATTR, is_streamed, materialize, release, trim_heap


class OutOfMemory(RuntimeError):
    """A stage ran out of memory; the message names the stage, the layer and what makes it fit."""


class TokenizerMismatch(ValueError):
    """The tokenizer makes ids the model's embedding does not have."""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


Step = Callable[[int, nn.Module, "list[LayerInput] | None"], "list[LayerInput] | None"]


def _device_of(module: nn.Module) -> torch.device | None:
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return None


@contextlib.contextmanager
def onloaded(model: nn.Module, arch: Arch, index: int, device: torch.device, keep: bool = True):
    """Decoder layer ``index`` on ``device`` for the duration. Afterwards it goes back where it was;
    for a streamed model its fp weights are dropped again unless ``keep`` (quantized modules, which
    the checkpoint does not hold, always stay, on the CPU)."""
    layer = decoder_layers(model, arch)[index]
    home = _device_of(layer) or torch.device("cpu")
    if is_streamed(model):
        materialize(layer, f"{arch.layers}.{index}.", getattr(model, STORE_ATTR), device)
    else:
        layer.to(device)
    try:
        yield layer
    finally:
        if is_streamed(model) and not keep:
            release(layer)
        else:
            layer.to(home)
        trim_heap()  # what the layer freed goes back to the OS, so memory stays flat in depth


@contextlib.contextmanager
def oom_guard(desc: str, device: torch.device, where: Callable[[], str]):
    """Out of memory inside becomes :class:`OutOfMemory`, naming ``desc``, ``where()`` and the fix."""
    try:
        yield
    except Exception as exc:
        if not _is_oom(exc):
            raise
        what = "GPU" if device.type == "cuda" else "CPU"
        raise OutOfMemory(
            f"{desc}: out of {what} memory at {where()} ({exc.__class__.__name__}). The activations of every window "
            f"are held on {device}: pass a smaller --batch-size, fewer --nsamples or a shorter --seqlen"
            + (", or --device cpu" if device.type == "cuda" else "") + ".") from None


def check_vocab(model: nn.Module, windows: torch.Tensor | None, desc: str) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if windows is not None and windows.numel() and int(windows.max()) >= vocab:
        raise TokenizerMismatch(f"{desc}: the text holds token id {int(windows.max())} but the model's vocabulary has "
                                f"{vocab} entries: the tokenizer does not belong to this model; save the model's own "
                                "tokenizer beside it.")


def visit(model: nn.Module, arch: Arch, indices, device: torch.device, *, keep: bool = True,
          progress: bool = True, desc: str = "layers"):
    """Yield ``(i, layer)`` for each decoder-layer index in ``indices`` (any order: a backward pass
    walks them in reverse), each on ``device`` only until the caller asks for the next. The one loop
    over layers that every stage runs on; :func:`sweep` is its forward form with activations."""
    for i, (layer,) in visit_together([model], arch, indices, device, keep=keep, progress=progress, desc=desc):
        yield i, layer


def visit_together(models: list[nn.Module], arch: Arch, indices, device: torch.device, *, keep: bool = True,
                   progress: bool = True, desc: str = "layers"):
    """:func:`visit` for several models of one architecture: yield ``(i, [layer i of each model])``,
    all on ``device`` until the caller asks for the next index."""
    indices = list(indices)
    trim_heap()  # also fixes glibc's mmap threshold before the first layer's buffers are allocated
    for i in tqdm(indices, desc=desc, disable=not progress or len(indices) < 2, unit="layer"):
        with contextlib.ExitStack() as stack:
            yield i, [stack.enter_context(onloaded(m, arch, i, device, keep)) for m in models]


def lockstep(models: list[nn.Module], arch: Arch, windows: torch.Tensor | None, device: torch.device, step: Step, *,
             batch_size: int = 8, keep: bool = True, progress: bool = True, desc: str = "layers", start: int = 0,
             resume: Callable[[list], list] | None = None) -> list:
    """:func:`sweep` for several models of one architecture side by side (a quantized model and its
    fp source, for KL divergence): layer ``i`` of every model is on ``device`` together, each model
    with its own activations of the same ``windows``; returns each model's last-layer outputs
    (``resume`` maps the list of first-layer inputs to the list to start from).
    Memory: one decoder layer and one set of activations per model, nothing held across layers."""
    for m in models:
        check_vocab(m, windows, desc)
    depths = {len(decoder_layers(m, arch)) for m in models}
    if len(depths) != 1:
        raise ValueError(f"{desc}: the models have different numbers of decoder layers ({sorted(depths)}): compare a "
                         "checkpoint with the model it was made from.")
    at = [-1]
    with oom_guard(desc, device, lambda: "the embeddings" if at[0] < 0 else f"decoder layer {at[0]}"):
        inputs = [capture_layer_inputs(m, decoder_layers(m, arch), windows, device, batch_size)
                  if windows is not None else None for m in models]
        if start:
            inputs = resume(inputs)
        for i, layers in visit_together(models, arch, range(start, depths.pop()), device, keep=keep,
                                        progress=progress, desc=desc):
            at[0] = i
            inputs = [step(i, layer, x) for layer, x in zip(layers, inputs)]
    return inputs


def sweep(model: nn.Module, arch: Arch, windows: torch.Tensor | None, device: torch.device, step: Step, *,
          batch_size: int = 8, keep: bool = True, progress: bool = True, desc: str = "layers", start: int = 0,
          resume: Callable[[list[LayerInput] | None], list[LayerInput] | None] | None = None) -> list[LayerInput] | None:
    """Run ``step`` on every decoder layer in order; returns the last layer's outputs.

    ``windows`` (n, seq) token ids are pushed to the first layer's inputs (``None``: stages that use
    no activations, like round-to-nearest). ``keep``: a streamed model keeps what the stage left in
    each layer (quantize) instead of dropping it again (evaluate). ``start``: begin at that layer,
    with the inputs ``resume(first layer's inputs)`` returns (a run resumed from saved layers: the
    first layer's inputs still give the per-batch arguments, masks and positions, that every layer
    shares). The one-model form of :func:`lockstep`."""
    return lockstep([model], arch, windows, device, step, batch_size=batch_size, keep=keep, progress=progress,
                    desc=desc, start=start, resume=resume and (lambda inputs: [resume(inputs[0])]))[0]


def head_logits(model: nn.Module, arch: Arch, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from the last decoder layer's output ``hidden`` (..., hidden): final norm,
    then ``lm_head``, as the model's own forward computes them (differentiable: callers that need no
    gradient run it under ``torch.no_grad``)."""
    norm, head = model.get_submodule(arch.norm), model.get_output_embeddings()
    logits = head(norm(hidden))  # (batch, seq, vocab)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap  # Gemma-2's soft cap, where a config sets one


HEAD_TOKENS = 512  # positions per lm_head call: (512, vocab) fp32 logits, 100 MB at a 49k vocabulary


def head_blocks(windows: int, positions: int, tokens: int = HEAD_TOKENS):
    """(window slice, first, last position) blocks covering ``windows`` × ``positions`` with at most
    ``tokens`` positions each: the head's logits stay (tokens, vocab) however many windows are scored."""
    step = min(positions, tokens)
    per = max(1, tokens // step)  # windows per block
    for w in range(0, windows, per):
        for a in range(0, positions, step):
            yield slice(w, min(w + per, windows)), a, min(a + step, positions)


@contextlib.contextmanager
def head_on(model: nn.Module, arch: Arch, device: torch.device):
    """The final norm and ``lm_head`` on ``device`` for the duration."""
    mods = [model.get_submodule(arch.norm), model.get_output_embeddings()]
    homes = [_device_of(m) or torch.device("cpu") for m in mods]
    for m in mods:
        m.to(device)
    try:
        yield
    finally:
        for m, h in zip(mods, homes):
            m.to(h)
