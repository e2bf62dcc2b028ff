#!/usr/bin/env bash
# Gathers what scripts/gpu-check.sh needs on a GPU machine that has nvcc, CMake, ninja and
# PyTorch + PEFT but neither the Debian dev packages nor a network: the build's libraries
# (downloaded as .deb files and extracted), the small test model and text, and the synthetic
# model writer. Writes .gpu-bundle/ (about 40 MB; git ignores it). Run it here, then carry
# .gpu-bundle to the GPU machine with the working tree and run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-bundle
rm -rf "$out"
mkdir -p "$out/root" "$out/data/models/stories260K" "$out/data/text" \
  "$out/data/tokenizers/llama2-spm"
debs=$(mktemp -d)
chmod a+rwx "$debs"  # apt downloads as its own user
(cd "$debs" && apt-get download libopenblas0-openmp libopenblas-openmp-dev libgfortran5 \
  nlohmann-json3-dev libcli11-dev libgtest-dev >/dev/null)
for deb in "$debs"/*.deb; do dpkg -x "$deb" "$out/root"; done
rm -rf "$debs"
# Only what the build links: the carried tree must stay under the device tool's 64 MiB.
find "$out/root" \( -name '*.a' ! -name 'libgtest*' -o -name 'liblapack*' -o -name 'libblas*' \) \
  -delete
rm -rf "$out/root/usr/share/doc" "$out/root/usr/share/man"
shared=../shared
cp "$shared"/data/models/stories260K/{stories260K.bin,tok512.bin} "$out/data/models/stories260K/"
cp "$shared"/data/text/tinystories_val.txt "$out/data/text/"
cp "$shared"/data/tokenizers/llama2-spm/tokenizer.model "$out/data/tokenizers/llama2-spm/"
cp "$shared"/bench/make_synthetic_llama.py "$out/"
du -sh "$out"
