#!/usr/bin/env bash
# One device run of the steps named as arguments (default: all), in this order:
#   gpu      the gpu-marked tests
#   tests    the tests named in the file $TESTS (node ids, one per line)
#   variants the vmapped weighting with each small-system solve (--unroll-max)
#   upgrad   the UPGrad tables (worst case over the families, TorchJD on the same card)
#   vmap     the vmapped weighting table
#   cagrad   CAGrad's inner solve over the families (m up to 16: its loop steps are kernel launches)
#   dp       examples/data_parallel.py on the machine's own devices (a data-parallel step against
#            a plain one)
#   suite    the default suite (stopped with SIGINT at SUITE_S seconds, so that pytest still
#            prints the names of the failures; a junit XML file is written to $OUT as well)
# Wheels for what the GPU image lacks (torchjd, qpsolvers, quadprog, qpax) travel in .whl/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=" ${*:-gpu variants upgrad vmap cagrad suite} "
has() { [[ "$steps" == *" $1 "* ]]; }
nvidia-smi -L; python3 -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__)"
if has gpu; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu -W ignore::UserWarning \
    tests/test_gpu.py > "$OUT/pytest_gpu_marker.txt" 2>&1
  echo "gpu-marked tests exit $?"; tail -3 "$OUT/pytest_gpu_marker.txt"
fi
if has tests; then
  timeout 150 python3 -m pytest -q -rf -n 8 -p no:cacheprovider -W ignore::UserWarning \
    $(cat "$TESTS") > "$OUT/pytest_named.txt" 2>&1
  echo "named tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_named.txt" | cut -c1-300
fi
if has dp; then
  timeout 120 python3 examples/data_parallel.py --real-devices --steps 30 2>&1 | grep -v Warning \
    | tee "$OUT/data_parallel_gpu.txt"
fi
cd benchmarks
if has variants; then
  timeout 100 python3 bench_vmap.py --batches 1024x16,256x32 --unroll-max 0,16 \
    --out "$OUT/vmap_variants_gpu.md" 2>&1 | grep -v Warning
  timeout 60 python3 bench_vmap.py --batches 64x64 --unroll-max 16,32 \
    --out "$OUT/vmap_variants64_gpu.md" 2>&1 | grep -v Warning
fi
if has upgrad; then
  timeout 200 python3 bench_upgrad.py --dtypes float32 \
    --sizes 64x1000,128x10000,256x10000,512x4000 --solvers "${UPGRAD_SOLVERS:-auto}" \
    --torchjd-max-m 128 --out "$OUT/upgrad_gpu.md" 2>&1 | grep -v Warning
  timeout 60 python3 bench_upgrad.py --dtypes float32 --sizes 8x1000000 \
    --solvers auto,nesterov_pgd --out "$OUT/upgrad_gpu_wide.md" 2>&1 | grep -v Warning
fi
if has vmap; then
  timeout 120 python3 bench_vmap.py --out "$OUT/vmap_gpu.md" 2>&1 | grep -v Warning
fi
if has cagrad; then
  timeout 90 python3 bench_cagrad.py --quick --out "$OUT/cagrad_gpu.md" 2>&1 | grep -v Warning
fi
cd ..
if has suite; then
  start=$(date +%s)
  timeout -s INT -k 20 "${SUITE_S:-200}" python3 -m pytest -q -rf -n "${SUITE_N:-12}" \
    -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" --deselect tests/test_notebooks.py \
    -W ignore::UserWarning tests jaxjd > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest exit $? after $(( $(date +%s) - start )) s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.txt" | cut -c1-200 | tail -40
fi
