#!/usr/bin/env bash
# Run the GPTQModel real-loader tests (pytest -m gptqmodel) on a CPU machine with torch 2.13+cpu.
#
# Where GPTQModel installs normally (a GPU machine with a matching torchvision), skip this script:
#   pip install gptqmodel optimum && pytest -m gptqmodel
# Here it does not: gptqmodel 7.7 needs torch>=2.14.1 and 7.4 pins numpy==2.2.6, and its import
# pulls torchvision, whose PyPI wheel is built against CUDA torch and fails on torch+cpu. So this
# script builds a throwaway venv on top of the system packages, installs gptqmodel 7.4.0 and optimum
# without their dependencies (plus the few small ones its import needs), and gives it a stub
# torchvision that only satisfies its InternVL import. transformers is imported first, so it sees
# no torchvision. Nothing here is used by hmq itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPTQ_VENV:-/tmp/hmq-gptqmodel-venv}
STUB=$VENV/tvstub
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install --quiet --no-deps gptqmodel==7.4.0 optimum==2.3.0 pypcre logbar threadpoolctl \
    device-smi tokenicer defuser
fi
mkdir -p "$STUB/torchvision/transforms"
: > "$STUB/torchvision/__init__.py"
: > "$STUB/torchvision/transforms/__init__.py"
printf 'import enum\n\nclass InterpolationMode(enum.Enum):\n    BICUBIC = "bicubic"\n' > "$STUB/torchvision/transforms/functional.py"
mkdir -p "$VENV/shim"
cat > "$VENV/shim/hmq_tvshim.py" <<PY
import sys
import transformers
from transformers import PreTrainedModel  # noqa: F401  (resolve transformers' lazy imports first)
import transformers.image_utils  # noqa: F401
sys.path.insert(0, "$STUB")
PY
PYTHONPATH="$VENV/shim" "$VENV/bin/python" -m pytest -p hmq_tvshim -q -m gptqmodel tests/test_export_formats.py tests/test_real.py "$@"
