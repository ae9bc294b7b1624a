"""Do vLLM and alignd's own engine serve the same tokens for a version? Greedy answers to the built-in world's
held-out prompts from both, on one model folder (a base, or an adapter version with its base), in float32 and in
bfloat16. Prints JSON: per dtype, the share of prompts whose answers are token-for-token identical and the mean
number of tokens before the first difference.

    python bench/vllm_parity.py --model HOME/checkpoints/v1 --vllm-python .vllm-venv/bin/python
    python bench/vllm_parity.py --model HOME/checkpoints/v3 --base HOME/checkpoints/v1 …   # an adapter version

Both engines get the prompt as the same token ids (alignd's chat template); vLLM runs the adapter unmerged (its LoRA
kernels) while alignd merges it into a copy of the base, so float32 answers may differ where two tokens' logits tie to
within rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.config import Settings  # noqa: E402
from service.engine import Engine, Policy, SamplingParams  # noqa: E402
from service.vllm_server import ManagedVLLM  # noqa: E402
from training import world  # noqa: E402
from training.lora import adapter_base  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else len(a)


def vllm_tokens(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    out = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for ids in prompts:
            body = {
                "model": model,
                "prompt": ids,
                "max_tokens": max_tokens,
                "temperature": 0,
                "return_token_ids": True,
            }
            choice = c.post("/v1/completions", json=body).json()["choices"][0]
            out.append(list(choice["token_ids"]))
    return out


def alignd_tokens(policy: Policy, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = Engine(policy, max_batch_size=1, threads=torch.get_num_threads())
    engine.start()
    eos = policy.tokenizer.eos_token_id
    try:
        out = []
        for ids in prompts:
            h = engine.submit([], SamplingParams(temperature=0, max_tokens=max_tokens), prompt_ids=ids)
            _, finish, _ = h.wait(120)
            out.append(list(h.token_ids) + ([eos] if finish == "stop" and len(h.token_ids) < max_tokens else []))
        return out
    finally:
        engine.stop()


def run(args, dtype: str) -> dict:
    model_dir = Path(args.model)
    base_dir = Path(args.base) if args.base else model_dir
    if adapter_base(model_dir) is not None and not args.base:
        raise SystemExit("--model is an adapter: name its base folder with --base")
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=home, vllm_python=args.vllm_python, device="cpu")
        server = ManagedVLLM(settings, base_dir, "base", dtype).start()
        try:
            name = "base"
            if model_dir != base_dir:
                name = "adapter"
                r = httpx.post(
                    f"{server.url}/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": str(model_dir)},
                    timeout=120,
                )
                r.raise_for_status()
            policy = Policy.load(0, model_dir, resolve_base=lambda stored: base_dir)
            policy.prepared(getattr(torch, dtype))
            tasks = world.eval_tasks(args.per_family)
            prompts = [policy.encode_chat([{"role": "user", "content": t.prompt}]) for t in tasks]
            theirs = vllm_tokens(server.url, name, prompts, args.max_tokens)
        finally:
            server.stop()
    ours = alignd_tokens(policy, prompts, args.max_tokens)
    agree = [first_difference(a, b) for a, b in zip(ours, theirs)]
    identical = [a == b for a, b in zip(ours, theirs)]
    return {
        "dtype": dtype,
        "prompts": len(prompts),
        "identical_share": round(sum(identical) / len(identical), 3),
        "mean_tokens_before_first_difference": round(statistics.mean(agree), 2),
        "mean_answer_tokens": round(statistics.mean(len(a) for a in ours), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model folder, or an adapter version's folder (with --base)")
    p.add_argument("--base", help="the base folder of an adapter --model")
    p.add_argument("--vllm-python", default=".vllm-venv/bin/python")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--per-family", type=int, default=8, help="held-out prompts per task family")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()
    results = [run(args, dtype) for dtype in args.dtypes.split(",")]
    print(json.dumps({"bench": "vllm_parity", "model": args.model, "base": args.base, "results": results}))


if __name__ == "__main__":
    main()
