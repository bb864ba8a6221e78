#!/usr/bin/env bash
# Learning in TensorRT (issue 13, TrtLearner) checked on a machine that has it: a Jetson with JetPack
# 6.1+ (`sudo apt install python3-libnvinfer`, a venv with --system-site-packages, NVIDIA's torch
# wheel) or a desktop GPU (`pip install tensorrt`). About 5 minutes; nothing is installed.
#
#   OUT=runs/trt examples/device/trt_learn_check.sh     # from the checkout; PYTHON=... picks the interpreter
#
# Writes to $OUT (default ./runs/trt):
#   env.txt                 TensorRT, torch, CUDA and GPU versions, the checkout's commit
#   tests_trt.log           pytest tests/test_trt_learner.py (the GPU tests: parity with OrtLearner and
#                           eager STOP, the engine cache, a stream resumed from its checkpoint)
#   stream_<backend>.json   `stoprt stream --learn` summaries on builtin:digits from one learning bundle:
#                           onnxruntime, tensorrt (first run: builds and caches the engines) and
#                           tensorrt_cached (second run: loads them; compare first_step_s)
#   run.log                 what ran and each exit status (124: hit its timeout)
set -u

repo="$(pwd)"
out="${OUT:-$repo/runs/trt}"
py="${PYTHON:-python3}"
mkdir -p "$out"
log="$out/run.log"
: > "$log"
pkg_root="$(mktemp -d /tmp/stoprt-path.XXXXXX)"   # the checkout as the package `stoprt`
ln -sfn "$repo" "$pkg_root/stoprt"
export PYTHONPATH="$pkg_root${PYTHONPATH:+:$PYTHONPATH}"
work="$(mktemp -d /tmp/stoprt-trt.XXXXXX)"

step() {  # step NAME TIMEOUT_S FILE CMD...: CMD under `timeout`, its output appended to FILE
    local name="$1" t="$2" file="$3"; shift 3
    echo "== $name (timeout ${t}s)" >> "$log"
    timeout -k 5 "$t" "$@" >> "$file" 2>&1
    echo "== $name: exit $?" | tee -a "$log"
}

{
    echo "# date"; date -u
    echo "# commit"; git -C "$repo" log -1 --format='%H %s' 2>/dev/null || echo "(not a git checkout)"
    "$py" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
    timeout 20 nvidia-smi 2>&1 || cat /etc/nv_tegra_release 2>/dev/null || true
} > "$out/env.txt"

: > "$out/tests_trt.log"
step tests 300 "$out/tests_trt.log" "$py" -m pytest -q -rs -p no:cacheprovider "$repo/tests/test_trt_learner.py"

step bundle 120 "$log" "$py" -c "
import torch
from stoprt.export.model_file import save_model
from stoprt.runtime.models import build_model
torch.manual_seed(0)
net = build_model('mlp', size=16, classes=10)
save_model('$work/mlp.stoprt', net, {'dt_us': 30000})"
step export 120 "$log" "$py" -m stoprt.cli export "$work/mlp.stoprt" --to onnx-learn "$work/bundle" --no-onnx
for run in onnxruntime tensorrt tensorrt_cached; do
    step "stream $run" 300 "$log" "$py" -m stoprt.cli stream --source builtin:digits:200 --model "$work/bundle" \
        --backend "${run%_cached}" --learn --quiet --json "$out/stream_$run.json"
done
ls "$work/bundle" >> "$log"
rm -rf "$work" "$pkg_root"
echo "results in $out"
