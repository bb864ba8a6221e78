#!/usr/bin/env bash
# STOP vs BPTT training memory on a CUDA machine (desktop GPU or Jetson): VGG-11 at 2x128x128 input,
# batch 16, T = 10, 30, 100, each configuration in a fresh process. Reports the CUDA allocator view
# (max_memory_allocated / max_memory_reserved) next to the planner's prediction, plus time per step.
#
#   examples/device/gpu_profile.sh            # from anywhere; PYTHON=... to choose the interpreter
#
# Results go to runs/gpu_profile/<machine>/ (profile.csv, profile.json, profile.png) and
# runs/gpu_profile/gpu_profile_<machine>.json (the summary), <machine> being the GPU's name from
# nvidia-smi (on a Jetson without it: the device-tree model). A configuration that does not fit
# (BPTT at T=100 needs about 60 GiB) is reported as out of memory with what it reached, not a crash.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi

if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_profile.sh: torch sees no CUDA device here ($py); run it on a GPU machine" >&2
    exit 2
fi

name=""
if command -v nvidia-smi >/dev/null 2>&1; then
    name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
fi
if [[ -z "$name" && -r /proc/device-tree/model ]]; then
    name="$(tr -d '\0' < /proc/device-tree/model)"
fi
if [[ -z "$name" ]]; then
    name="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0))')"
fi
machine="$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')"
out="runs/gpu_profile/$machine"
echo "gpu_profile.sh: $name -> $out"

"$py" -m stoprt.cli profile --model vgg11 --size 128 --channels 2 --classes 10 --batch 16 \
    --mode stop,bptt --T 10,30,100 --device cuda --timeout 900 --out "$out"
"$py" examples/device/gpu_profile_summary.py "$out/profile.json" "runs/gpu_profile/gpu_profile_$machine.json" \
    --machine "$name"
