#!/usr/bin/env bash
# Run one benchmark suite on a GPU machine that received the repository and .device/ from
# benchmarks/device_prepare.sh (benchmarks/README.md, "On a GPU machine"): the carried wheels
# are installed beside the image's own JAX (CUDA) and torch, JAX and torch compute on the GPU,
# and the results go to $OUT (else benchmarks/results) as <suite>-gpu.json and .md.
#
#   bash benchmarks/device_run.sh kernels|population|pairwise [more options for the suite]
#   bash benchmarks/device_run.sh tests [pytest options]    # the test suite there, log in $OUT
#
# TORCH_DEVICE=cpu runs the torch peers on the CPU: for a dry run on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: device_run.sh kernels|population|pairwise|tests [options]}
shift
torch_device=${TORCH_DEVICE:-cuda}
wheels=.device/core
[ "$suite" = pairwise ] && wheels=.device/pairwise
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAXREG_SHARED_DATA=$PWD/.device/data
[ -f "$wheels/COMMIT" ] && export JAXREG_COMMIT=$(cat "$wheels/COMMIT")
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/$suite-gpu-device.txt" 2>&1
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
case $suite in
  kernels) python3 benchmarks/kernels.py --torch-device "$torch_device" --out "$out/kernels-gpu.json" "$@" ;;
  population) python3 benchmarks/population.py --large --host-devices 1 --out "$out/population-gpu.json" "$@" ;;
  pairwise) python3 benchmarks/pairwise.py --only oasis3d --methods jaxreg,jaxreg-cached,jaxreg-fine,fireants,fireants-greedy --torch-device "$torch_device" \
              --tag gpu --out "$out" "$@" ;;
  # The tests pin JAX to the CPU unless JAX_PLATFORMS says otherwise; here they run on the GPU, and each
  # xdist worker takes GPU memory as it goes instead of the 75% that JAX would reserve per process.
  tests) [ "$torch_device" = cpu ] && platform=cpu || platform=cuda
         JAX_PLATFORMS=${JAX_PLATFORMS:-$platform} XLA_PYTHON_CLIENT_PREALLOCATE=false \
           python3 -m pytest -q -p no:cacheprovider -n 8 "$@" > "$out/tests-gpu.log" 2>&1
         status=$?; tail -30 "$out/tests-gpu.log"; exit $status ;;
  *) echo "unknown suite $suite: kernels, population, pairwise or tests" >&2; exit 2 ;;
esac
