#!/usr/bin/env bash
# One device run: the benchmarks on the GPU (float32), then the default suite there (stopped
# with SIGINT at SUITE_S seconds, so that pytest still prints the names of the failures).
# Wheels for what the GPU image lacks (torchjd, qpsolvers, quadprog, qpax) travel in .whl/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)"
cd benchmarks
timeout 200 python3 bench_upgrad.py --dtypes float32 \
  --sizes 64x1000,128x10000,256x10000,512x4000 --solvers auto,bpp_gather \
  --torchjd-max-m 128 --out "$OUT/upgrad_gpu.md" 2>&1 | grep -v Warning
timeout 60 python3 bench_upgrad.py --dtypes float32 --sizes 8x1000000 \
  --solvers auto,nesterov_pgd --out "$OUT/upgrad_gpu_wide.md" 2>&1 | grep -v Warning
timeout 60 python3 bench_vmap.py --out "$OUT/vmap_gpu.md" 2>&1 | grep -v Warning
cd ..
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::UserWarning tests/test_gpu.py \
  > "$OUT/pytest_gpu_marker.txt" 2>&1; echo "gpu-marked tests exit $?"; tail -3 "$OUT/pytest_gpu_marker.txt"
start=$(date +%s)
timeout -s INT -k 30 "${SUITE_S:-200}" python3 -m pytest -q -rf -n 8 -p no:cacheprovider \
  --deselect tests/test_notebooks.py -W ignore::UserWarning tests jaxjd > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.txt" | tail -40
