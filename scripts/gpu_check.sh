#!/usr/bin/env bash
# The GPU suite, the step's op count and the GPU benchmark on a bare GPU machine, then a summary: under 8 minutes with
# the default timeouts (each part's timeout, plus 20 s each for the install and the version probe).
#
# The machine needs torch with CUDA, torchvision (and its Pillow), pytest, numpy, scikit-learn, tqdm and PyYAML (a
# CUDA image usually has them) and no network: what else is missing comes as wheels in .whl/ at the repo root, all
# installed. omegaconf is pure Python and needs only PyYAML; fetch it where pip works, for the GPU machine's Python:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0
# Then, on the GPU machine, from the repo root:   bash scripts/gpu_check.sh
# Logs go to $OUT (or /tmp/gpu-check): gpu-tests.log, step-ops.md, gpu-benchmark.md, summary.txt. TESTS_TIMEOUT,
# STEP_OPS_TIMEOUT and BENCHMARK_TIMEOUT (seconds, 240, 60 and 120) fit the parts into a lease (STEP_OPS_TIMEOUT=0 skips
# the op count); BENCHMARK_STEPS (40) and BENCHMARK_REPEATS (1) set the benchmark's steps per epoch and its repeats of
# every cell (one process of each of the six cells takes about 270 s on an H200 at 60 steps and 8 timed epochs, by the
# runs in docs/gpu.md); it skips a process BENCHMARK_TIMEOUT would not hold and runs the next. BENCHMARK_ARGS adds options,
# e.g. BENCHMARK_ARGS='--models resnet18 --modes "bf16 + channels_last" --timed-epochs 8' for the cells in question.
# Without a CUDA device it stops at once with exit code 2: there is nothing to check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
started=$(date +%s)

# The repo itself needs no install: the tests and benchmarks put it on the path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    timeout 20 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/gpu-check-site .whl/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
fi
if ! "$python" -c "import omegaconf" 2>/dev/null; then
    echo "gpu_check: omegaconf cannot be imported: put its wheel (and PyYAML's, if missing) in .whl/" \
        "(see the top of this script)" >&2
    exit 2
fi

versions=$(timeout 20 "$python" - <<'EOF'
import platform, sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (Python {platform.python_version()}, torch {torch.__version__}): nothing to check")
nccl = ".".join(map(str, torch.cuda.nccl.version()))
print(f"{torch.cuda.get_device_name()}; Python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {nccl}")
EOF
) || { echo "gpu_check: the version probe failed (its reason is above)" >&2; exit 2; }
echo "gpu_check: $versions"

# The suite first (at most 4 minutes on one GPU), then the benchmark: both loops, resnet18 and resnet50, 3 modes.
# GPU_TESTS narrows the suite (pytest node ids, space-separated), e.g. to rerun one test beside a longer benchmark.
# shellcheck disable=SC2086
timeout "${TESTS_TIMEOUT:-240}" "$python" -m pytest -m gpu -q -rs -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu.py} 2>&1 \
    | tee "$out/gpu-tests.log"
tests_status=${PIPESTATUS[0]}
# The ops and kernels each step of resnet18 (bf16 + channels_last, eager) adds to the hand-written loop's, the
# fastest epoch of each, and the host's µs per step in each phase: where the host sets the pace, this is the gap.
# 10 timed epochs (by the fourth run's epochs, about 12 s of timing on an H200, inside STEP_OPS_TIMEOUT's 60 s with
# the start-up and the profiled epochs), so that epochs slower than the rest show in its table of epochs.
ops_status=0
if [ "${STEP_OPS_TIMEOUT:-60}" -gt 0 ]; then
    timeout "${STEP_OPS_TIMEOUT:-60}" "$python" benchmarks/step_ops.py --device cuda --model resnet18 --batch-size 256 \
        --steps 40 --timed-epochs 10 --workers 4 2>&1 | tee "$out/step-ops.md"
    ops_status=${PIPESTATUS[0]}
else
    echo "skipped: STEP_OPS_TIMEOUT=0" > "$out/step-ops.md"
fi
# The benchmark starts no pair that would end past its budget, 30 s inside the timeout, and prints the table of what
# it measured: with more repeats asked than fit, it runs as many as the time allows.
bench_timeout=${BENCHMARK_TIMEOUT:-120}
eval "options=(${BENCHMARK_ARGS:-})"  # the quoted mode names keep their spaces
timeout "$bench_timeout" "$python" benchmarks/gpu_throughput.py --repeats "${BENCHMARK_REPEATS:-1}" \
    --steps "${BENCHMARK_STEPS:-40}" --budget-s $((bench_timeout - 30)) "${options[@]}" 2>&1 | tee "$out/gpu-benchmark.md"
bench_status=${PIPESTATUS[0]}

{
    echo "## GPU check, $(date -u +%Y-%m-%d) ($(( $(date +%s) - started )) s)"
    echo "$versions"
    echo "pytest -m gpu (exit $tests_status): $(grep -E '(passed|failed|error|skipped)' "$out/gpu-tests.log" | tail -n 1)"
    echo "benchmarks/step_ops.py (exit $ops_status):"
    grep -E '^\|' "$out/step-ops.md"
    echo "benchmarks/gpu_throughput.py (exit $bench_status):"
    grep -E '^\||img/s' "$out/gpu-benchmark.md"
} | tee "$out/summary.txt"
[ "$tests_status" -eq 0 ] && [ "$ops_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
