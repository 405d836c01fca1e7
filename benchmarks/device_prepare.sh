#!/usr/bin/env bash
# Stage, on this machine, what a GPU machine that receives only the repository needs for the
# GPU rows of the benchmarks (benchmarks/README.md, "On a GPU machine"): wheels of the
# packages its image lacks (CPython 3.12, manylinux) and a copy of the OASIS pair, under
# .device/ (in .gitignore: never committed).
#
#   bash benchmarks/device_prepare.sh        # about 60 MB, most of it SimpleITK
#
# .device/core      nibabel: enough for jaxreg, the kernels and population suites (the image has
#                   jax with CUDA, torch, flax, optax, scipy)
# .device/pairwise  the same plus FireANTs and what it imports (SimpleITK, hydra-core, omegaconf,
#                   antlr4), for the pairwise suite's FireANTs-on-GPU row
# .device/data      OASIS 0001 and 0002, aligned_norm and aligned_seg35 (the oasis3d case)
set -euo pipefail
cd "$(dirname "$0")/.."
download() {
  local into=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$into" "$@"
}
rm -rf .device/core .device/pairwise .device/data
mkdir -p .device/core .device/pairwise .device/data/oasis
download .device/core nibabel==5.4.2
cp .device/core/*.whl .device/pairwise/
# FireANTs 1.5.0 pins SimpleITK 2.2.1, which has no CPython 3.12 wheel; 2.5 reads and writes
# the same images. --no-deps at install time lets the pin pass.
download .device/pairwise fireants==1.5.0 SimpleITK==2.5.7 hydra-core==1.3.8 omegaconf==2.3.1
# omegaconf needs antlr4 4.9.*, published as a source archive only: built here into a pure wheel.
python3 -m pip wheel -q --no-deps -w .device/pairwise antlr4-python3-runtime==4.9.3
data=${JAXREG_SHARED_DATA:-../shared/data}
for subject in OASIS_OAS1_0001_MR1 OASIS_OAS1_0002_MR1; do
  mkdir -p ".device/data/oasis/$subject"
  cp "$data/oasis/$subject/aligned_norm.nii.gz" "$data/oasis/$subject/aligned_seg35.nii.gz" ".device/data/oasis/$subject/"
done
git rev-parse HEAD > .device/core/COMMIT
cp .device/core/COMMIT .device/pairwise/COMMIT
du -sh .device/*
