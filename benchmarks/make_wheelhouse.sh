#!/usr/bin/env bash
# Builds wheelhouse/ (git-ignored): what benchmarks/gpu.py needs that the GPU machine lacks, for benchmarks/run_gpu.sh
# to install there without network. Run it here, from a clone with .venv built (make test); ~1 minute, ~48 MiB.
#
# What travels (wheelhouse/requirements.txt pins it; benchmarks/README.md lists it):
#   * hf_siglip (a wheel of this checkout), open_clip_torch, siglip-kernel and accelerate: installed --no-deps (their
#     requirements are torch/torchvision/timm/triton from the device, or listed here: pip resolving anything that
#     requires torch would re-check torch's own requirements, e.g. setuptools >= 77, against the new venv's);
#   * transformers, datasets, accelerate, tokenizers, huggingface_hub, safetensors, pyyaml (hf_siglip's requirements
#     that gpu.py uses), regex, ftfy, tqdm (open_clip's), and everything they require in turn, each at the version
#     in .venv (ftfy, wcwidth, siglip-kernel, not in .venv: PyPI's newest);
# less what the device brings: torch and its CUDA builds (torch, torchvision, triton, nvidia-*), timm, numpy, pillow
# and pyarrow (55 MiB: the bundle must stay under the 64 MiB the device run carries; datasets needs pyarrow >= 24,
# which run_gpu.sh checks first). matplotlib and evaluate (hf_siglip's plot and metric extras of `hf-siglip train`)
# are not used by gpu.py and stay behind too.
# Binary wheels are for Linux x86_64 and .venv's CPython (3.11 here): the device is assumed to run the same Python
# minor version (run_gpu.sh checks it); PYVER=312 bash benchmarks/make_wheelhouse.sh builds for another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}
EXCLUDE=${EXCLUDE:-torch torchvision triton timm numpy pillow pyarrow matplotlib evaluate}
OUT=wheelhouse

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" .

# name==version of the roots and of every installed distribution they require, transitively (base requirements)
PINS=$(EXCLUDE="$EXCLUDE" "$PY" - <<'EOF'
import importlib.metadata as md
import os

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

exclude = {canonicalize_name(name) for name in os.environ["EXCLUDE"].split()}
pins = {}
todo = ["transformers", "datasets", "accelerate", "tokenizers", "huggingface_hub", "safetensors", "pyyaml", "regex",
        "tqdm"]
while todo:
    name = canonicalize_name(todo.pop())
    if name in pins or name in exclude or name.startswith("nvidia-"):
        continue
    distribution = md.distribution(name)
    pins[name] = distribution.version
    for line in distribution.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            todo.append(requirement.name)
open_clip = md.version("open_clip_torch")
print(" ".join([f"{name}=={version}" for name, version in sorted(pins.items())] + [f"open_clip_torch=={open_clip}"]))
EOF
)
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$OUT" \
    --python-version "$PYVER" --implementation cp --abi "cp$PYVER" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any $PINS ftfy wcwidth siglip-kernel 2> >(grep -v "is ignored: it is neither a file" >&2)
{
    echo "# benchmarks/run_gpu.sh installs these (with their requirements, from wheelhouse/ or the device)"
    tr ' ' '\n' <<<"$PINS" | grep -v -E '^(open_clip_torch|accelerate)=='
    ls "$OUT" | grep -E '^(ftfy|wcwidth)-' | sed -E 's/^([a-z]+)-([^-]+)-.*/\1==\2/'
} > "$OUT/requirements.txt"
{
    echo "# installed --no-deps"
    echo "hf_siglip"
    grep -E '^(open_clip_torch|accelerate)==' <<<"${PINS// /$'\n'}"
    ls "$OUT" | grep -E '^siglip_kernel-' | sed -E 's/^siglip_kernel-([^-]+)-.*/siglip-kernel==\1/'
} > "$OUT/no-deps.txt"
echo "wheelhouse/: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh --apparent-size "$OUT" | cut -f1) (cp$PYVER, linux x86_64;" \
     "left to the device: $EXCLUDE)"
