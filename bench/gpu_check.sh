#!/usr/bin/env bash
# GPU readiness check, one prepared script: builds a model at SmolLM2-135M's shape
# (bench/shapes.py, random weights, no download), then with ALIGND_DEVICE (default cuda)
#   1. bench/serve.py: `alignd serve` on that device, 1 and 16 HTTP clients, against HF's static batch of 16;
#   2. bench/cycle.py: `alignd bootstrap --base`, `alignd serve` following the registry, one LoRA cycle (reward model,
#      PPO, gate, publish) with bf16 autocast on CUDA, publish -> served;
# and prints the device line and both benchmarks' JSON, one per line.
#
#   bench/gpu_check.sh                                          # a GPU machine: ~5-10 min
#   ALIGND_DEVICE=cpu SHAPE=smollm2-135m-2l QUICK=1 bench/gpu_check.sh   # smoke check of the script on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export ALIGND_DEVICE="${ALIGND_DEVICE:-cuda}"
SHAPE="${SHAPE:-smollm2-135m}"
if [ "${QUICK:-0}" = 1 ]; then  # the smallest run that still goes through every step
    SERVE_ARGS=(--client-levels 1 --offline static --max-tokens 4 --requests-per-client 1 --baseline-requests 1 --rounds 1)
    CYCLE_ARGS=(--feedback 8)
else
    SERVE_ARGS=(--client-levels 1,16 --offline static --max-tokens 32 --requests-per-client 2 --baseline-requests 4)
    CYCLE_ARGS=(--feedback 24)
fi
work="$(mktemp -d -t alignd-gpu-check-XXXX)"
trap 'rm -rf "$work"' EXIT

python - <<'PY'
import json, os, torch
cuda = torch.cuda.is_available()
print(json.dumps({
    "check": "device",
    "ALIGND_DEVICE": os.environ["ALIGND_DEVICE"],
    "torch": torch.__version__,
    "cuda": cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
}))
if os.environ["ALIGND_DEVICE"].startswith("cuda") and not cuda:
    raise SystemExit("ALIGND_DEVICE asks for CUDA but torch sees no GPU")
PY
python bench/shapes.py --shape "$SHAPE" --out "$work/model" --json
python bench/serve.py --model "$work/model" "${SERVE_ARGS[@]}" | python -c "import json, sys; print(json.dumps(json.load(sys.stdin)))"
python bench/cycle.py --base "$work/model" --modes lora --device "$ALIGND_DEVICE" "${CYCLE_ARGS[@]}"
