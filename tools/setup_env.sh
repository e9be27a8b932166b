#!/usr/bin/env bash
# Set up a fresh machine for qdrop_mm: virtualenv, torch, mmcv 2.1.0 with compiled
# ops (built once against the installed torch and cached as a wheel outside the
# checkout), the pinned OpenMMLab stack, and qdrop_mm in editable mode.
#
#   VENV            where the virtualenv goes (default: .venv in the checkout)
#   PYTHON          interpreter for the venv (default: python3.11, else python3)
#   TORCH_SPEC      torch requirement (default torch==2.13.0; bring your CUDA torch by
#                   installing it into the venv first — an importable torch is kept)
#   QDROP_MM_CACHE  wheel cache (default ~/.cache/qdrop_mm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CACHE=${QDROP_MM_CACHE:-$HOME/.cache/qdrop_mm}
MMCV_VERSION=2.1.0
start=$(date +%s)
log() { echo "[setup_env] $*"; }

[ -x "$VENV/bin/python" ] || { log "creating $VENV with $PYTHON"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# torch 2.13 needs setuptools >= 77; mmcv's setup.py imports pkg_resources, which 80.x still ships.
pip_install setuptools==80.9.0 wheel==0.45.1 ninja==1.11.1.4
if ! "$PY" -c 'import torch' 2>/dev/null; then
  log "installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
"$PY" -c 'import torch' || { echo "torch failed to install ($TORCH_SPEC)" >&2; exit 1; }
pip_install 'numpy==1.26.4'

TORCH_TAG=$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS="$CACHE/wheels/torch-$TORCH_TAG"
mkdir -p "$WHEELS"
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
  wheel=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-$PY_TAG-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    log "building mmcv $MMCV_VERSION with ops against torch $TORCH_TAG (about 20 min on 2 cores; cached in $WHEELS)"
    src=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$src"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -q --no-build-isolation --no-deps \
      -w "$WHEELS" "$src"/mmcv-$MMCV_VERSION.tar.gz
    rm -rf "$src"
    wheel=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-$PY_TAG-*.whl | head -n 1)
  else
    log "reusing cached $wheel"
  fi
  pip_install --no-deps "$wheel"
fi

pip_install -r requirements/lock.txt
pip_install --no-deps --no-build-isolation -e .
"$PY" -c 'import mmcv.ops, mmdet, mmseg, qdrop_mm; print("[setup_env] ok: mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__)'
log "done in $(( $(date +%s) - start )) s"
