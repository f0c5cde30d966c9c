#!/usr/bin/env bash
# Obtains ptxas (NVIDIA's PTX assembler, CUDA 13.0) from NVIDIA's PyPI wheel, unpacked into
# ~/.cache/weft/cuda: the tests assemble every generated kernel with it, on machines with no GPU.
# Downloaded, never vendored (NVIDIA's licence). Idempotent.
set -euo pipefail
dir="$HOME/.cache/weft/cuda"
ptxas="$dir/nvidia/cu13/bin/ptxas"
if [ -x "$ptxas" ]; then
  exit 0
fi
mkdir -p "$dir/whl"
echo "ptxas: fetching nvidia-cuda-nvcc 13.0.88 from PyPI"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/whl" nvidia-cuda-nvcc==13.0.88
(cd "$dir" && unzip -q -o whl/nvidia_cuda_nvcc-13.0.88-*.whl 'nvidia/cu13/bin/ptxas')
chmod +x "$ptxas"
rm -rf "$dir/whl"
"$ptxas" --version | tail -1
