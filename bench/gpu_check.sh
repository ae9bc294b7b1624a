#!/usr/bin/env bash
# GPU readiness check, one prepared script: builds a model at SmolLM2-135M's shape (bench/shapes.py, random weights,
# no download), then with ALIGND_DEVICE (default cuda)
#   1. bench/serve.py: `alignd serve` on that device, 1 and 16 HTTP clients, against HF's static batch of 16;
#   2. bench/cycle.py: `alignd bootstrap --base`, `alignd serve` following the registry, one LoRA cycle (reward model,
#      PPO, gate, publish) with bf16 autocast on CUDA, publish -> served;
#   3. only when VLLM_PYTHON names the python of a venv with vLLM (its CUDA build on a GPU machine):
#      bench/serve.py --engine builtin,vllm (alignd's engine, alignd over vLLM, vLLM called directly; 1 and 16 clients)
#      at the built-in size (as a Llama) and at the 135 M shape, and bench/vllm_swap.py (publish an adapter -> both
#      processes of `alignd serve --workers 2` serve it through vLLM);
# and prints the device line and every benchmark's JSON, one per line.
#
# It has not run on a GPU yet (this project has had none): steps 1-2 were checked on CPU as below; step 3's two
# benchmarks ran on CPU against vLLM's CPU build (on a GPU, alignd starts vLLM without the CPU settings and the
# comparison caps vLLM at half the GPU's memory, since alignd's own engine shares the GPU during it).
#
#   bench/gpu_check.sh                                                   # a GPU machine: ~5-10 min (+ vLLM: ~10 min)
#   VLLM_PYTHON=/opt/vllm/bin/python bench/gpu_check.sh                  # ... and the vLLM steps
#   ALIGND_DEVICE=cpu SHAPE=smollm2-135m-2l QUICK=1 bench/gpu_check.sh   # smoke check of the script on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export ALIGND_DEVICE="${ALIGND_DEVICE:-cuda}"
SHAPE="${SHAPE:-smollm2-135m}"
if [ "${QUICK:-0}" = 1 ]; then  # the smallest run that still goes through every step
    SERVE_ARGS=(--client-levels 1 --offline static --max-tokens 4 --requests-per-client 1 --baseline-requests 1 --rounds 1)
    CYCLE_ARGS=(--feedback 8)
    VLLM_SERVE_ARGS=(--client-levels 1,16 --max-tokens 8 --requests-per-client 1 --rounds 1)
    VLLM_SWAP_ARGS=(--publishes 1 --clients 1)
else
    SERVE_ARGS=(--client-levels 1,16 --offline static --max-tokens 32 --requests-per-client 2 --baseline-requests 4)
    CYCLE_ARGS=(--feedback 24)
    VLLM_SERVE_ARGS=(--client-levels 1,16 --max-tokens 32 --requests-per-client 4 --rounds 3)
    VLLM_SWAP_ARGS=(--publishes 5 --clients 2)
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

if [ -n "${VLLM_PYTHON:-}" ]; then
    # alignd's own engine runs beside vLLM on the same GPU during the comparison: vLLM takes half its memory, not 90 %
    if [[ "$ALIGND_DEVICE" == cuda* ]]; then export ALIGND_VLLM_ARGS="${ALIGND_VLLM_ARGS:---gpu-memory-utilization 0.5}"; fi
    one_line() { python -c "import json, sys; print(json.dumps(json.load(sys.stdin)))"; }
    python bench/serve.py --engine builtin,vllm --vllm-python "$VLLM_PYTHON" "${VLLM_SERVE_ARGS[@]}" | one_line
    python bench/serve.py --engine builtin,vllm --vllm-python "$VLLM_PYTHON" --shape "$SHAPE" "${VLLM_SERVE_ARGS[@]}" | one_line
    python bench/vllm_swap.py --vllm-python "$VLLM_PYTHON" "${VLLM_SWAP_ARGS[@]}"
fi
