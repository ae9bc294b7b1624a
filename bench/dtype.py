"""Serving dtype on the built-in model: the world's evaluation (training/evaluate.py) in float32 and in bfloat16 on
the same weights, and how often greedy answers agree. Decides, with `bench/serve.py --single-stream`'s speeds,
where `ALIGND_DTYPE=auto` switches to bfloat16 (core/config.py BF16_MIN_PARAMETERS). Prints JSON.

    python bench/dtype.py --sft-seconds 90            # bootstrap's SFT for 90 s first (the default assistant)
    python bench/dtype.py --model PATH                # any local checkpoint folder, e.g. under ALIGND_HOME
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluate import EvalConfig, evaluate_policy  # noqa: E402

KEYS = ("score/mean", "heldout_score", "over_caution", "harmful_compliance", "jailbreak_compliance", "length_mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: bootstrap one)")
    ap.add_argument("--sft-seconds", type=float, default=90.0)
    ap.add_argument("--per-family", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", type=Path, help="keep the bootstrapped model here (for bench/serve.py --model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from training.model import load_causal_lm

        model, tok = load_causal_lm(args.model)
        name = str(args.model)
    else:
        from training.bootstrap import BootstrapConfig, bootstrap
        from training.sft import SFTConfig

        cfg = BootstrapConfig(sft=SFTConfig(max_seconds=args.sft_seconds), eval=EvalConfig(n_per_family=2))
        model, tok, _ = bootstrap(cfg)
        name = f"built-in gpt2 after {args.sft_seconds:.0f} s of bootstrap SFT"
        if args.save:
            model.save_pretrained(args.save)
            tok.save_pretrained(args.save)
    model.eval()
    cfg = EvalConfig(n_per_family=args.per_family)
    result: dict = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "prompts": None}
    samples = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        start = time.perf_counter()
        metrics = evaluate_policy(m, tok, cfg, return_samples=True)
        samples[dtype] = [r for _, r in metrics.pop("samples")]
        result["prompts"] = metrics["n"]
        result[str(dtype)[6:]] = {k: round(metrics[k], 4) for k in KEYS} | {
            "eval_seconds": round(time.perf_counter() - start, 1)
        }
    same = sum(a == b for a, b in zip(samples[torch.float32], samples[torch.bfloat16], strict=True))
    result["greedy_identical_answers"] = f"{same}/{len(samples[torch.float32])}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
