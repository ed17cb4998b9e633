"""Fixtures: tiny models built from a config (no download) with a tokenizer trained on text made here."""
from __future__ import annotations

import os
import random

import torch as _torch

if not _torch.cuda.is_available():  # Triton kernels run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

WORDS = ("the a compiler program memory network protocol data file system user kernel process thread "
         "function variable language machine computer software hardware interface object class method "
         "runs uses stores sends reads writes builds calls returns defines is was has of in to for with "
         "and or but fast small large simple early modern common").split()


def make_text(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    sents = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        sents.append(" ".join(words).capitalize() + ".")
    paras = [" ".join(sents[i : i + 5]) for i in range(0, len(sents), 5)]
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_text(2000, 0).split("\n"), trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return path


def tiny_config(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    if model_type in ("qwen3", "gemma3_text", "gemma3"):
        base["head_dim"] = 16
    if model_type in ("phi3", "gpt2"):  # their defaults name ids of a larger vocabulary
        base.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":
        base["n_inner"] = base.pop("intermediate_size")
    if model_type == "mixtral":  # 4 routed experts, 2 per token
        base.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type in ("qwen2_moe", "qwen3_moe", "deepseek_v2"):
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    if model_type == "qwen2_moe":  # a shared expert beside the routed ones
        base.update(shared_expert_intermediate_size=96)
    if model_type == "qwen3_moe":  # its second layer dense, as mlp_only_layers makes it
        base.update(mlp_only_layers=[1], head_dim=16)
    if model_type == "deepseek_v2":  # latent attention (q straight, kv through a rank-32 code), a dense first layer
        base.update(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
                    num_key_value_heads=4)
    if model_type in ("gemma3_text", "gemma3"):  # a sliding window shorter than the test windows, so it matters
        base.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    base.update(kw)
    if model_type == "gemma3":  # the multimodal model: a tiny vision tower beside the text decoder
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return AutoConfig.for_model("gemma3", text_config=base, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=255, boi_token_index=253, eoi_token_index=254)
    return AutoConfig.for_model(model_type, **base)


def build_tiny(model_type: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


@pytest.fixture
def tiny_model():
    return build_tiny("llama")


def save_tiny(path, tokenizer_dir, max_shard_size: str | None = None, model_type: str = "llama", **config):
    """A tiny model (a Llama unless ``model_type`` says; ``config`` overrides) saved with
    save_pretrained in ``path``, with its tokenizer, as a user's local folder; returns ``path``."""
    from transformers import AutoTokenizer

    build_tiny(model_type, **config).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Llama saved with save_pretrained, with its tokenizer, as a user's local folder."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text(1500, 1))
    return path


def windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


def run(*argv) -> int:
    """The hmq command line, in this process."""
    import cli

    return cli.main([str(a) for a in argv])


def run_logged(caplog, *argv) -> int:
    """:func:`run` with hmq's log records (its logger does not propagate) captured in ``caplog``."""
    import logging

    log = logging.getLogger("hmq")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="hmq"):
            return run(*argv)
    finally:
        log.removeHandler(caplog.handler)


class Killed(BaseException):
    """Stands for SIGKILL in resume tests: nothing in hmq catches it."""


@pytest.fixture(scope="session")
def deep_model_dir(tmp_path_factory, tokenizer_dir):
    """A 4-layer tiny Llama folder: room to stop a sweep part way."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama-4"), tokenizer_dir, num_hidden_layers=4)
