#!/usr/bin/env bash
# Issue 12's GPU measurements in one run (7.5 minutes at most): the STOP step benchmark on CUDA
# (with the fused step: compile="fused", torch.compile + CUDA graphs), the CUDA tests,
# `stoprt stream --device cuda --learn` static and fused, and the machine's versions.
#
#   OUT=runs/gpu examples/device/step_bench_gpu.sh     # from the checkout; PYTHON=... picks the interpreter
#
# Needs torch with CUDA and the checkout only (no internet, no TensorRT, no install: the project is
# imported through a `stoprt` symlink in /tmp). Every part runs under its own `timeout`, shrunk to
# what is left of the overall budget, so one hang cannot eat the rest; a failing part is logged and
# the next one runs. Writes at most 9 files to $OUT (default ./runs/gpu):
#   env.txt            nvidia-smi, torch / CUDA / cuDNN versions, the checkout's commit
#   step_bench.json    examples/benchmarks/step_bench.py --device cuda (written after each stage)
#   step_bench.md      the same as a table
#   stream_cuda.json   the --json summary of `stoprt stream --source builtin:digits --learn --device cuda`
#                      (builtin:gestures where scikit-learn is absent)
#   stream_cuda.log    that command's output
#   stream_cuda_fused.json, stream_cuda_fused.log   the same with --compile fused
#   tests_cuda.log     pytest on the static-step, exactness, ONNX export, lean-op and binning test files
#   run.log            what ran, for how long, and each exit status (124: hit its timeout)
set -u

repo="$(pwd)"
out="${OUT:-$repo/runs/gpu}"
py="${PYTHON:-python3}"
budget_s="${BUDGET_S:-420}"   # the whole script (7.5 minutes at most, with the kill grace of each part)
mkdir -p "$out"
log="$out/run.log"
: > "$log"
start=$(date +%s)

# The project as the package `stoprt`, whatever the checkout's folder is called.
pkg_root="$(mktemp -d /tmp/stoprt-path.XXXXXX)"
ln -sfn "$repo" "$pkg_root/stoprt"
export PYTHONPATH="$pkg_root${PYTHONPATH:+:$PYTHONPATH}"
export STOPRT_CACHE_DIR="${STOPRT_CACHE_DIR:-/tmp/stoprt-cache}"

note() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$log"; }

# run NAME WANT_S CMD...: CMD under `timeout`, given WANT_S seconds or what is left (minus a reserve
# of 10 s per later part), output appended to run.log unless CMD redirects it.
run() {
    local name="$1" want="$2"; shift 2
    local left=$(( budget_s - ($(date +%s) - start) - 10 * ${later_parts:-0} ))
    local t=$(( want < left ? want : left ))
    if (( t < 10 )); then note "$name: skipped, ${left}s left"; return 0; fi
    note "$name: start (timeout ${t}s)"
    local t0=$(date +%s)
    timeout -k 5 "$t" "$@" >> "$log" 2>&1
    local rc=$?
    note "$name: exit $rc after $(( $(date +%s) - t0 ))s"
}

note "step_bench_gpu.sh in $repo -> $out (budget ${budget_s}s, python: $py)"

# 1. Versions (seconds).
later_parts=4
{
    echo "# date"; date -u
    echo "# commit"; git -C "$repo" log -1 --format='%H %s' 2>/dev/null || echo "(not a git checkout)"
    echo "# nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "(nvidia-smi unavailable)"
    echo "# python / torch"
    timeout 60 "$py" -c 'import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "memory GiB", round(p.total_memory / 2**30, 1), "SMs", p.multi_processor_count)
for m in ("onnxruntime", "onnx", "pytest", "numpy", "psutil", "sklearn"):
    try:
        print(m, __import__(m).__version__)
    except ImportError:
        print(m, "absent")' 2>&1
} > "$out/env.txt"
note "env: $(grep -m1 '^device' "$out/env.txt" || echo 'no CUDA device seen by torch')"

# The digit stream renders scikit-learn's digits once (then they are cached); without scikit-learn
# the stream measurements use the synthetic gestures stream, which needs nothing more.
source=builtin:digits
if ! timeout 60 "$py" -c "import sklearn" >/dev/null 2>&1; then
    source=builtin:gestures
    note "scikit-learn absent: the stream runs on $source instead of builtin:digits"
fi

# 2. The step benchmark on CUDA (the main result; its JSON is rewritten after every stage).
later_parts=3
run step_bench 260 "$py" examples/benchmarks/step_bench.py --device cuda --out "$out" --stream-timeout 75 \
    --stream-source "$source"

# 3. CUDA tests: the static step, exactness, and every test file that touches CUDA.
later_parts=2
tests=()
# (The files whose tests run on CUDA; the CLI files that only mention "cuda" test its refusal on a
# machine without one and take minutes.)
for f in tests/test_static_step.py tests/test_exactness.py tests/test_export_onnx.py tests/test_lean_ops.py tests/test_binning.py; do
    [[ -f "$f" ]] && [[ " ${tests[*]} " != *" $f "* ]] && tests+=("$f")
done
# (the fused step's CUDA test only: its CPU tests compile five networks with Inductor's C++ backend)
[[ -f tests/test_fused_step.py ]] && tests+=("tests/test_fused_step.py::test_cuda_fused_graphs_equal_eager")
note "tests: ${tests[*]}"
run tests 120 bash -c '"$0" -m pytest -v -p no:cacheprovider -rs --durations=10 --continue-on-collection-errors "${@:2}" > "$1/tests_cuda.log" 2>&1' \
    "$py" "$out" "${tests[@]}"
tail -n 3 "$out/tests_cuda.log" 2>/dev/null | tee -a "$log"

# 4. The stream on CUDA, on its own (also inside the benchmark; this one survives a benchmark hang),
# then fused (its summary's steady_steps_per_s leaves out the first step, which compiles).
later_parts=1
run stream_cuda 60 bash -c '"$0" -m stoprt.cli stream --source "$2" --learn --threads 1 \
    --device cuda --quiet --json "$1/stream_cuda.json" > "$1/stream_cuda.log" 2>&1' "$py" "$out" "$source"
later_parts=0
run stream_cuda_fused 90 bash -c '"$0" -m stoprt.cli stream --source "$2" --learn --threads 1 \
    --device cuda --compile fused --quiet --json "$1/stream_cuda_fused.json" > "$1/stream_cuda_fused.log" 2>&1' \
    "$py" "$out" "$source"

rm -rf "$pkg_root"
note "done; files in $out:"
ls -la "$out" | tee -a "$log"
