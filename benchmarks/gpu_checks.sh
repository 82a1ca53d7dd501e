#!/usr/bin/env bash
# Every check that needs a GPU, in one run: the CUDA tests, the CPU-vs-CUDA check, the image-scale
# rows at every precision (with SpRAy and TCAV) and the Dask scale-out with one worker per GPU.
#
#   bash benchmarks/gpu_checks.sh [OUTPUT_DIR]
#   GPU_CHECKS="cuda_tests image_scale" IMAGE_SCALE_ONLY=scale bash benchmarks/gpu_checks.sh
#
# Each step has its own time limit (590 s in all), so one that hangs does not cost the others;
# the JSON results and a log per step are copied to OUTPUT_DIR (default: benchmarks/results/gpu).
# Run from the repository root with the package importable (the venv of `make test`, or
# PYTHON=python3 with skdebias on PYTHONPATH). Exits 0 when every step passed, 1 otherwise; the summary says which.
set -u
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "No CUDA device visible to $PYTHON: nothing to check." >&2
    exit 1
fi
"$PYTHON" - <<'EOF' | tee "$OUT_DIR/device.txt"
import torch
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA",
      torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
EOF

status=0
summary=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    summary+=("$name: rc $rc, $((SECONDS - start)) s")
    [ "$rc" -eq 0 ] || status=1
}

# GPU_CHECKS: the steps to run (default: all four); IMAGE_SCALE_ONLY: its sections
CHECKS=${GPU_CHECKS:-cuda_tests cuda_check image_scale scale_out}
wanted() { [[ " $CHECKS " == *" $1 "* ]]; }
# the memory tests read /proc figures that the lent machines do not report like a Linux host
wanted cuda_tests && step cuda_tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py tests/test_extraction.py \
    -k "not memory_is_bounded and not memory_of_a_large"
wanted cuda_check && step cuda_check 60 "$PYTHON" -W ignore benchmarks/cuda_check.py
# shellcheck disable=SC2086
wanted image_scale && step image_scale 280 "$PYTHON" -W ignore benchmarks/image_scale.py \
    --device cuda --only ${IMAGE_SCALE_ONLY:-scale spray tcav}
wanted scale_out && step scale_out 160 "$PYTHON" -W ignore benchmarks/scale_out.py --device cuda

cp benchmarks/results/cuda_check.json benchmarks/results/image_scale.json \
    benchmarks/results/scale_out.json "$OUT_DIR"/ 2>/dev/null
printf '%s\n' "${summary[@]}" | tee "$OUT_DIR/summary.txt"
exit $status
