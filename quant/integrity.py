"""Checksums of checkpoint shards, kept in each safetensors file's own metadata.

Every tensor's raw bytes (as safetensors stores them: contiguous, little-endian) get a SHA-256; a
shard's digest is the SHA-256 of its sorted ``name:digest`` lines. Both go into the shard's header
metadata (``hmq.sha256`` and ``hmq.tensor_sha256``), which loaders that do not know them ignore.
On load the digests are recomputed from the tensors read, so a flipped byte is reported with the
file and the tensor it hit; a truncated file already fails to open in safetensors.
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch

SHARD_KEY = "hmq.sha256"
TENSORS_KEY = "hmq.tensor_sha256"
log = logging.getLogger("hmq")


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _shard_digest(digests: dict[str, str]) -> str:
    lines = "".join(f"{name}:{d}\n" for name, d in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def shard_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Metadata entries to pass to ``safetensors.torch.save_file`` for one shard."""
    digests = {name: tensor_sha256(t) for name, t in tensors.items()}
    return {SHARD_KEY: _shard_digest(digests), TENSORS_KEY: json.dumps(digests, sort_keys=True)}


def verify(file: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> str | None:
    """Compare a shard's tensors with the digests in its metadata. Returns a message naming the file
    and tensor(s) that differ, or None when all match (or the shard carries no digests)."""
    if not metadata or SHARD_KEY not in metadata:
        return None
    try:
        stored = json.loads(metadata.get(TENSORS_KEY, "{}"))
    except json.JSONDecodeError:
        return f"{file}: its {TENSORS_KEY} metadata is not valid JSON (the header was edited)."
    digests = {name: tensor_sha256(t) for name, t in tensors.items()}
    if _shard_digest(digests) == metadata[SHARD_KEY] and digests == stored:
        return None
    bad = sorted(n for n in set(digests) | set(stored) if digests.get(n) != stored.get(n))
    if not bad:  # tensors agree with the per-tensor list but not with the shard digest
        return f"{file}: the {SHARD_KEY} shard checksum does not match its tensors (the header was edited)."
    what = [f"{n} ({'missing' if n not in digests else 'not listed' if n not in stored else 'contents changed'})"
            for n in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{file}: SHA-256 mismatch for {', '.join(what)}{more}; the shard is corrupt or was modified."


def against_listing(f, metadata: dict | None, listed: dict[str, str] | None) -> str | None:
    """A shard's own digest against hmq.json's list; a shard with no digests is reported, not passed."""
    own = (metadata or {}).get(SHARD_KEY)
    if own is None:
        if listed is not None:
            return (f"{f}: the shard carries no SHA-256 digests, but hmq.json lists one for it "
                    f"({str(listed.get(f.name))[:12]}…): it was replaced after export.")
        log.warning("%s carries no SHA-256 digests (not written by hmq): its contents cannot be checked", f)
        return None
    if listed is not None and f.name in listed and listed[f.name] != own:
        return f"{f}: its SHA-256 ({own[:12]}…) is not the one hmq.json lists ({listed[f.name][:12]}…): it was replaced."
    return None
