"""Calibration and evaluation text, tokenized, with calibration and evaluation kept apart.

Sources: ``wikitext2`` and ``c4`` from the Hugging Face hub via ``datasets`` (their own
train/validation/test splits), ``foldoc`` (the offline default: the Free On-line Dictionary of
Computing from Debian's ``dict-foldoc``), or a local ``.txt`` file or folder of them, read with
``datasets``' ``text`` builder.

Every source has three disjoint parts (DEVELOPERS.md, "Measuring honestly"):
``calib`` (what GPTQ and the measurements see), ``select`` (what any choice, a default, a constant
or a search, is scored on) and ``eval`` (the reporting text, never used to choose anything).
Sources without splits of their own are split by a hash of each document, so a document is in one
part only: one in ``SHARE`` documents is reporting text, one other in ``SHARE`` selection text.
"""
from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import torch

DEFAULT_SOURCE = "foldoc"
HUB_SOURCES = ("wikitext2", "c4")
SHARE = 10  # a source without splits: hash bucket 0 of SHARE is reporting text, bucket 1 selection text
SPLITS = ("calib", "select", "eval")


class DataError(ValueError):
    """Calibration or evaluation text is missing, empty or too short; the message says what to do."""


def _part(doc_key: str) -> str:
    """Which part a document of a source without splits belongs to (the reporting part is the one
    that was "held out" before selection text existed, so reporting numbers stay comparable)."""
    bucket = zlib.crc32(doc_key.encode()) % SHARE
    return "eval" if bucket == 0 else "select" if bucket == 1 else "calib"


# ---- FOLDOC -------------------------------------------------------------------------------------

_FOLDOC_LINK = re.compile(r"\{([^{}]*?)(?: \([^(){}]*\))?\}")  # {text (url)} or {text} -> text
_FOLDOC_NOISE = [
    re.compile(r"<[^<>\n]{1,40}>"),  # <programming> domain tags
    re.compile(r"\(\d{4}-\d{2}-\d{2}\)"),  # (2003-06-03) dates
    re.compile(r"\[[^\[\]]{0,400}\]"),  # [sources], may span lines
    re.compile(r"\b(?:https?|ftp)://\S+"),
]


def foldoc_path() -> Path:
    from quant.model_io import data_dir

    for cand in (data_dir() / "foldoc.dict.dz", Path("/usr/share/dictd/foldoc.dict.dz")):
        if cand.is_file():
            return cand
    raise DataError(
        "the offline default corpus (FOLDOC) is not installed: run scripts/setup-offline.sh (it extracts Debian's "
        f"dict-foldoc into {data_dir()}), or pass --calib/--data wikitext2, c4 or a local .txt file or folder."
    )


def foldoc_documents() -> list[tuple[str, str]]:
    """(headword, cleaned definition) pairs from the dictd file, dictionary markup stripped."""
    raw = gzip.open(foldoc_path(), "rt", encoding="utf-8", errors="replace").read()
    docs, head, body = [], None, []
    for line in raw.splitlines():
        if line and not line[0].isspace():
            if head is not None:
                docs.append((head, body))
            head, body = line.strip(), []
        elif head is not None:
            body.append(line.strip())
    if head is not None:
        docs.append((head, body))
    out = []
    for head, body in docs:
        if head.startswith("00-database"):
            continue
        text = "\n".join(body).strip()
        for _ in range(2):  # links may nest once
            text = _FOLDOC_LINK.sub(r"\1", text)
        for pattern in _FOLDOC_NOISE:
            text = pattern.sub("", text)
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        text = "\n\n".join(p for p in paragraphs if len(p.split()) >= 3)
        if text:
            out.append((head, text))
    return out


# ---- sources ------------------------------------------------------------------------------------


def _local_documents(path: Path) -> list[tuple[str, str]]:
    from datasets import load_dataset

    files = sorted(str(p) for p in path.rglob("*.txt")) if path.is_dir() else [str(path)]
    if not files:
        raise DataError(f"folder {str(path)!r} holds no .txt files: pass a .txt file or a folder of them.")
    ds = load_dataset("text", data_files=files, sample_by="paragraph", split="train")
    return [(f"{i}:{t[:64]}", t) for i, t in enumerate(ds["text"]) if t.strip()]


def is_local(source: str | None) -> bool:
    """Whether ``source`` is the user's own file or folder (not a named dataset)."""
    return bool(source) and source not in (DEFAULT_SOURCE, *HUB_SOURCES)


def own_text_split(source: str | None, default: str, shared: bool = False) -> str:
    """The part of ``source`` a command reads: the whole of a user's own file (``"all"``) unless the
    same run both calibrates and evaluates on it (``shared``), else ``default``."""
    return "all" if is_local(source) and not shared else default


def load_text(source: str | None, split: str) -> tuple[str, str]:
    """(name, text) of ``source``'s calibration (``split='calib'``), selection (``'select'``) or
    reporting (``'eval'``) part; ``'all'``: the whole of a local file or folder."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, not {split!r}")
    source = source or DEFAULT_SOURCE
    if split == "all" and not is_local(source):
        raise ValueError(f"split 'all' is for a local file or folder, not {source!r}")
    if source == "wikitext2":
        from datasets import load_dataset

        try:
            ds = load_dataset("wikitext", "wikitext-2-raw-v1",
                              split={"calib": "train", "select": "validation", "eval": "test"}[split])
        except Exception as exc:
            raise DataError(f"could not load wikitext2 from the Hugging Face hub ({exc.__class__.__name__}); "
                            "offline, use --calib/--data foldoc or a local .txt file.") from None
        return source, "\n\n".join(ds["text"])  # the standard GPTQ protocol joins the raw lines this way
    if source == "c4":
        from datasets import load_dataset

        name = "en/c4-train.00000-of-01024.json.gz" if split == "calib" else "en/c4-validation.00000-of-00008.json.gz"
        try:
            ds = load_dataset("allenai/c4", data_files={"x": name}, split="x")
        except Exception as exc:
            raise DataError(f"could not load c4 from the Hugging Face hub ({exc.__class__.__name__}); "
                            "offline, use --calib/--data foldoc or a local .txt file.") from None
        # GPTQ's c4 eval: the first 1100 validation docs; selection: the next 1100
        texts = ds["text"] if split == "calib" else ds["text"][:1100] if split == "eval" else ds["text"][1100:2200]
        return source, "\n\n".join(texts)
    if source == "foldoc":
        docs = foldoc_documents()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"calibration source {source!r} is neither a known dataset (foldoc, wikitext2, c4) "
                            "nor an existing .txt file or folder.")
        docs = _local_documents(path)
    text = "\n\n".join(t for key, t in docs if split == "all" or _part(key) == split)
    return source, text


def tokenize(tokenizer, text: str, name: str = "text") -> torch.Tensor:
    """Token ids (n,) of ``text`` as one stream (special tokens as the tokenizer adds them once)."""
    if not text.strip():
        raise DataError(f"the {name} is empty: give a file or dataset with text in it.")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # (n,)
    return ids


def leading_bos(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` starts every text with it (Gemma, Llama), else None (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    first = tokenizer("a", verbose=False).input_ids[:1]
    return int(bos) if first == [bos] else None


def calibration_windows(tokenizer, source: str | None = None, nsamples: int = 32, seqlen: int = 512,
                        seed: int = 0, split: str = "calib") -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (nsamples, seqlen) from the calibration part
    (``split='all'``: the whole of a local file); seeded. Where the tokenizer starts texts with a BOS
    token, every window does: BOS, then ``seqlen - 1`` tokens of text.

    A long text is not tokenized whole: each window comes from a random stretch of about
    ``12 * seqlen`` characters (≈ 3 windows' worth of tokens), tokenized on its own, with the
    window placed at random inside it — the same distribution at a fraction of the cost.
    """
    name, text = load_text(source, split)
    if not text.strip():
        raise DataError(f"the calibration text of {name} is empty: give a file or dataset with text in it.")
    bos = leading_bos(tokenizer)
    lead = 0 if bos is None else 1  # the BOS the tokenizer put first
    width = seqlen - lead  # text tokens per window
    gen = torch.Generator().manual_seed(seed)
    span = 12 * seqlen
    windows = []
    if len(text) > 4 * span:
        for start in torch.randint(0, len(text) - span, (nsamples,), generator=gen).tolist():
            ids = tokenize(tokenizer, text[start : start + span], f"calibration text of {name}")[lead + 1:]  # drop a cut token
            if ids.numel() <= width:
                break
            s = int(torch.randint(0, ids.numel() - width, (1,), generator=gen))
            windows.append(ids[s : s + width])
    if len(windows) < nsamples:  # short text (or very long tokens): tokenize it whole
        ids = tokenize(tokenizer, text, f"calibration text of {name}")[lead:]
        if ids.numel() <= width:
            raise DataError(f"the calibration text of {name} has {ids.numel()} tokens; at least {width + 1} are "
                            f"needed for --seqlen {seqlen}: give more text or a smaller --seqlen.")
        starts = torch.randint(0, ids.numel() - width, (nsamples,), generator=gen)
        windows = [ids[s : s + width] for s in starts.tolist()]
    out = torch.stack(windows)  # (nsamples, width)
    if bos is not None:
        out = torch.cat([out.new_full((nsamples, 1), bos), out], 1)
    return out  # (nsamples, seqlen)


def eval_tokens(tokenizer, source: str | None = None, split: str = "eval") -> tuple[str, torch.Tensor]:
    """The reporting text (or, with ``split='select'``, the selection text) as one token stream."""
    name, text = load_text(source, split)
    what = {"select": "selection", "eval": "evaluation", "calib": "calibration", "all": "evaluation"}[split]
    return name, tokenize(tokenizer, text, f"{what} text of {name}")
