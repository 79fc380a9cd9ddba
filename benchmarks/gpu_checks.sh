#!/usr/bin/env bash
# The checks a GPU session runs, in at most 9 minutes of device time, from the repository root:
#
#   1. bench_layers.py --device cuda --no-compile   full grid, eager: layer tables, plan tables and the
#                                                   traffic weight fit (which TRAFFIC_WEIGHT["cuda"] to use)
#   2. bench_layers.py --device cuda --quick        4096², rank 16: eager vs torch.compile, compiled stacks
#   3. the tests that need CUDA                     (grep -rn "cuda.is_available" tests/)
#   4. tests/tensornets on that machine's torch     (another torch than CI's: 2.11 on 2026-12-04, within the
#                                                   declared range; it found the Tucker / CP compile break)
#
# Every step runs under `timeout`, sized from what is left of the budget (GPU_CHECKS_BUDGET_S, default 540 s), so
# one slow step cannot eat the others' time; bench_layers.py writes what it measured when `timeout` stops it.
# Results go to benchmarks/results/layers_cuda.{md,json} and layers_cuda_quick.{md,json}, and with the log
# (gpu_checks.log) into $OUT when it is set (the device tool brings $OUT back: 5 files here, at most 8 allowed).
#
# The GPU machine's python3 (3.12) has torch and transformers, pytest, peft and opt_einsum, but not tensorly or
# tltorch (tensorly-torch) and cannot download: carry them as wheels in .whl/ (ignored by git, so name it in
# `carry`). Before the session, here:
#   python -m pip download --no-deps --only-binary=:all: -d .whl tensorly==0.10.0 tensorly-torch==0.5.0 \
#       compressed-tensors==0.20.1 gguf==0.19.0 peft==0.21.2   # the CUDA tests import compress (and its pins)
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#       pydantic_core==2.50.5 loguru==0.7.3 annotated-types==0.8.0 typing-inspection==0.4.5  # compressed-tensors'
# then: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=600) (about 6-7 minutes of device
# time with the start, by the steps' times on 2026-12-04). Without them the benchmark leaves the tltorch columns
# empty and the rest runs.
#
#   bash benchmarks/gpu_checks.sh --cpu-dry-run    # here: the same steps on the CPU at --smoke size, results in
#                                                  # a temporary folder (checks the script, not the GPU)
set -uo pipefail  # no -e: a failed step is reported and the next one still runs

cd "$(dirname "$0")/.." || exit 1
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # progress lines reach the log as they happen

if [[ ${1:-} == --cpu-dry-run ]]; then
    DEVICE=cpu
    RESULTS=$(mktemp -d /tmp/gpu_checks_dry.XXXXXX)
    EAGER=(--device cpu --smoke --no-compile --out "$RESULTS/eager")
    COMPILED=(--device cpu --smoke --out "$RESULTS/compiled")
    OUT_COPY=""  # a dry run never writes into $OUT
    WORKERS=2
else
    DEVICE=cuda
    RESULTS=benchmarks/results
    EAGER=(--device cuda --no-compile --out "$RESULTS")
    COMPILED=(--device cuda --quick --out "$RESULTS")
    OUT_COPY=${OUT:-}
    WORKERS=14  # the H200 machine's 16 cores, one thread each
fi
START=$(mktemp /tmp/gpu_checks_start.XXXXXX)  # results older than this are from an earlier run
if [[ -n $OUT_COPY ]]; then
    mkdir -p "$OUT_COPY"
    exec > >(tee -a "$OUT_COPY/gpu_checks.log") 2>&1  # the whole log comes back even if the call is cut short
fi

# Run "$@" under a timeout of at most $2 seconds that also leaves $3 seconds of the budget to the later steps
# (both written for the default budget of 540 s and scaled to GPU_CHECKS_BUDGET_S).
STATUS=()
step() {
    local name=$1 cap=$(($2 * BUDGET / 540)) reserve=$(($3 * BUDGET / 540))
    shift 3
    local t=$((BUDGET - SECONDS - reserve))
    ((t > cap)) && t=$cap
    if ((t < 20)); then
        echo "== $name: skipped, ${t}s left of the budget"
        STATUS+=("$name: skipped")
        return
    fi
    echo "== $name (timeout ${t}s, ${SECONDS}s into the budget of ${BUDGET}s)"
    timeout -k 20 "$t" "$@"
    local rc=$?
    echo "== $name: exit $rc$( ((rc == 124)) && echo ' (timed out)') at ${SECONDS}s"
    STATUS+=("$name: exit $rc")
}

# Copy one run's results into $OUT (the device tool's return folder).
keep() {
    [[ -z $OUT_COPY ]] && return
    [[ $RESULTS/$1.md -nt $START ]] || { echo "no new $RESULTS/$1.md to keep"; return; }
    cp -f "$RESULTS/$1".md "$RESULTS/$1".json "$OUT_COPY/" 2>/dev/null || echo "no $RESULTS/$1.{md,json} to keep"
}

# Step 0: carried wheels (tensorly, tltorch) into /tmp/site; the repository itself by PYTHONPATH (no build,
# no index: nothing can be downloaded there).
if compgen -G ".whl/*.whl" >/dev/null; then
    step "install .whl" 60 420 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Step 1: what ran: the GPU, the driver, the versions, and which optional packages are missing.
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
fi
"$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("tensornets", "transformers", "opt_einsum", "tensorly", "tltorch", "peft", "pytest", "numpy"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:  # a missing package is a finding, not a reason to stop
        print(f"  {name}: MISSING ({type(exc).__name__}: {exc})")
EOF
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no usable CUDA device: stopping (run with --cpu-dry-run to check the script on a CPU)"
    exit 1
fi

# Step 2: the full grid, eager (about 1-2 min on an H200): the plan tables and the traffic weight fit.
step "bench eager (${EAGER[*]})" 140 360 "$PY" benchmarks/bench_layers.py "${EAGER[@]}"
keep layers_cuda

# Step 3: eager vs compiled at 4096², then compiled stacks; compiling takes most of it, and what finishes before
# the timeout is written.
step "bench compiled (${COMPILED[*]})" 190 170 "$PY" benchmarks/bench_layers.py "${COMPILED[@]}"
keep layers_cuda_quick

# Step 4: the tests that need CUDA (the rest of the suite runs on CPU machines): the compression pipeline on the GPU
# against the CPU, the CLI's device checks, and bench_layers.py's --device cuda smoke run.
step "pytest cuda" 50 120 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
    tests/compress/test_pipeline.py tests/compress/test_cli.py tests/benchmarks/test_bench_layers_device.py

# Step 5: the core's tests on that machine's torch, one thread per process (108 s with 14 on 2026-12-04; at the
# default thread count 8 processes ran out of time). test_demo.py needs the MiniLM weights package, not carried.
step "pytest tensornets (torch $("$PY" -c 'import torch; print(torch.__version__)'))" 150 0 \
    env OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -n $WORKERS -rfE --tb=short \
    --ignore tests/tensornets/test_demo.py tests/tensornets

# Summary last: the device tool's reply shows the end of the output.
echo
echo "== summary (${SECONDS}s)"
printf '  %s\n' "${STATUS[@]}"
for md in "$RESULTS"/layers_cuda.md "$RESULTS"/layers_cuda_quick.md "$RESULTS"/eager/*.md "$RESULTS"/compiled/*.md; do
    [[ $md -nt $START ]] || continue
    echo "-- $md"
    grep -m1 "Stopped early" "$md"
    sed -n '/^## Traffic weight fit/,/^Rows the current weight/p' "$md" | grep -E '^\| |^Rows'
done
