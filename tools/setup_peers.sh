#!/usr/bin/env bash
# Build the virtualenv for tools/bench_peers.py: the peer PTQ tools (AIMET, Brevitas, MQBench) on top of
# qdrop_mm's own environment, which is never touched (peers are not dependencies of qdrop_mm).
#
#   bash tools/setup_peers.sh                      # .venv-peers next to .venv
#   BASE_VENV=/path/to/.venv bash tools/setup_peers.sh
#
#   BASE_VENV   qdrop_mm's virtualenv made by tools/setup_env.sh (default: .venv in the checkout); its
#               site-packages (torch, mmcv, mmdet, mmengine, numpy) are reused through a .pth file
#   PEERS_VENV  where the peer venv goes (default: .venv-peers in the checkout)
#
# The peers go in with --no-deps so that pip can never replace torch, numpy or onnx of the base venv;
# the few extra dependencies they import are listed below. The script ends by printing the torch version
# seen from the peer venv (it must be the base venv's) and one line per peer: imported, or the exact error.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_VENV=${BASE_VENV:-.venv}
PEERS_VENV=${PEERS_VENV:-.venv-peers}
log() { echo "[setup_peers] $*"; }

[ -x "$BASE_VENV/bin/python" ] || { echo "error: $BASE_VENV/bin/python not found: run tools/setup_env.sh first or set BASE_VENV" >&2; exit 1; }
BASE_SITE=$("$BASE_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
BASE_TORCH=$("$BASE_VENV/bin/python" -c 'import torch; print(torch.__version__)')
if [ ! -x "$PEERS_VENV/bin/python" ]; then
  log "creating $PEERS_VENV (base interpreter of $BASE_VENV)"
  "$BASE_VENV/bin/python" -m venv "$PEERS_VENV"
fi
PY="$PEERS_VENV/bin/python"
PEER_SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
# the base venv's packages come after the peer venv's own in sys.path
echo "$BASE_SITE" > "$PEER_SITE/_qdrop_mm_base_venv.pth"
echo "$(pwd)" > "$PEER_SITE/_qdrop_mm_checkout.pth"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# The peers, pinned, without their dependency trees.
pip_install --no-deps aimet-torch==2.42.0 brevitas==0.13.4 mqbench-torch2==0.1.1
# What they import at the code paths bench_peers uses, minus what the base venv already has
# (torch, numpy, scipy, onnx, networkx, jinja2, pyyaml, tqdm, sympy, packaging, matplotlib, pillow,
# prettytable): found by importing aimet_torch (v2 quantsim, AdaRound, Seq-MSE), brevitas (graph
# quantize, GPTQ, calibrate) and mqbench (prepare_by_platform, advanced_ptq) until nothing was missing.
# torchvision: aimet_torch imports it at top level; 0.28.0 is the release for torch 2.13, but PyPI's
# wheel is a CUDA build whose C ops cannot load with CPU torch (qdrop_mm/benchmarks/peers.py says how
# the benchmark imports it anyway; it never calls a torchvision op).
pip_install --no-deps torchvision==0.28.0 bokeh==3.6.3 tornado==6.6.1 xyzservices==2026.9.1 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 \
  onnx-ir==1.1.0 onnxscript==0.7.2 safetensors==0.8.0 psutil==7.2.2 dependencies==2.0.1 unfoldNd==0.2.3 \
  accelerate==1.15.0  # brevitas_examples learned round imports accelerate.utils.operations

after=$("$PY" -c 'import torch; print(torch.__version__)')
log "torch: base venv $BASE_TORCH, seen from $PEERS_VENV $after"
[ "$after" = "$BASE_TORCH" ] || { echo "error: the peer venv sees torch $after, not the base venv's $BASE_TORCH" >&2; exit 1; }
"$PY" - <<'EOF'
import importlib, traceback
from qdrop_mm.benchmarks.peers import import_torchvision_without_ops
err = import_torchvision_without_ops()
if err:
    print(f'[setup_peers] torchvision: {err} (CUDA wheel, CPU torch); bench_peers imports it without its op registrations')
for name in ('aimet_torch', 'aimet_torch.adaround.adaround_weight', 'aimet_torch.seq_mse', 'aimet_torch.model_preparer',
             'brevitas', 'brevitas_examples.imagenet_classification.ptq.ptq_common',
             'brevitas_examples.imagenet_classification.ptq.learned_round_utils', 'mqbench',
             'mqbench.prepare_by_platform', 'mqbench.advanced_ptq'):
    try:
        mod = importlib.import_module(name)
        print(f'[setup_peers] {name}: imported {getattr(mod, "__version__", "")} from {mod.__file__}')
    except Exception as err:  # report, do not stop: bench_peers records the same error per cell
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        print(f'[setup_peers] {name}: import failed: {last}')
EOF
