#!/usr/bin/env bash
# On the GPU machine, no network: install wheelhouse/ (benchmarks/make_wheelhouse.sh, built here and carried along)
# into a venv that also sees the device's own packages (its CUDA torch, torchvision, timm, numpy, pyarrow), then run
# benchmarks/gpu.py with its JSON, its table and this log in $OUT. Extra arguments go to gpu.py (--sections loss).
#
#     OUT=results bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/hf-siglip-gpu-venv}
mkdir -p "$OUT"
exec > >(tee "$OUT/run_gpu.log") 2>&1
start=$(date +%s)

[ -f wheelhouse/requirements.txt ] || { echo "no wheelhouse/: run bash benchmarks/make_wheelhouse.sh first"; exit 2; }
# what the wheelhouse assumes of the device (benchmarks/make_wheelhouse.sh); each failure is one line
"$PYTHON" - <<'EOF'
import glob, sys
wheel = [w for w in glob.glob("wheelhouse/pandas-*.whl")][0]
tag = wheel.split("-")[2]  # cp311
here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
if tag != here:
    sys.exit(f"wheelhouse/ holds {tag} wheels but this python is {here}: PYVER={here[2:]} bash "
             "benchmarks/make_wheelhouse.sh where the wheelhouse is built")
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}", end="")
print(f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
for name, least in (("numpy", (2, 0)), ("pyarrow", (24, 0))):  # pandas 3 and datasets 5 need these
    try:
        module = __import__(name)
    except ImportError:
        sys.exit(f"{name} is not on this machine: make_wheelhouse.sh leaves it out (EXCLUDE); carry it")
    if tuple(int(part) for part in module.__version__.split(".")[:2]) < least:
        sys.exit(f"{name} {module.__version__} < {'.'.join(map(str, least))}: carry it (EXCLUDE in make_wheelhouse.sh)")
EOF

rm -rf "$VENV"
if "$PYTHON" -m venv --system-site-packages "$VENV" 2>/dev/null; then
    PIP=("$VENV/bin/python" -m pip)
else  # no ensurepip (Debian without python3-venv): a venv without pip, filled by this python's pip
    "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
    PIP=("$PYTHON" -m pip --python "$VENV/bin/python")
fi
"${PIP[@]}" install --isolated --quiet --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
"${PIP[@]}" install --isolated --quiet --no-index --find-links wheelhouse --no-deps -r wheelhouse/no-deps.txt
echo "installed in $(( $(date +%s) - start )) s"

HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$VENV/bin/python" benchmarks/gpu.py --out "$OUT" "$@"
echo "run_gpu.sh: $(( $(date +%s) - start )) s in all"
