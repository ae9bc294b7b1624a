"""Helpers shared by the benchmarks that start `alignd serve` processes."""

from __future__ import annotations

import random
import subprocess
import time

import httpx


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    """Block until `url`/readyz answers 200; raise if `proc` exits or the timeout passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.2)


# the policy metrics the training benchmarks print before and after (training.evaluate.evaluate_policy keys)
EVAL_KEYS = (
    "score/mean",
    "heldout_score",
    "over_caution",
    "harmful_compliance",
    "jailbreak_compliance",
    "length_mean",
    "oracle_utility",
    "kl_to_ref",
)


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def world_responses(model, tok, n_prompts: int, k: int, seed: int, rng: random.Random):
    """(tasks, prompts, columns): `n_prompts` world tasks and k responses to each — the greedy one first (what the
    evaluation and the served policy give), then k - 1 samples (seeds seed + j) — for labelling by simulated
    annotators. The tasks are drawn from `rng`, which the caller goes on using for the labels."""
    from training import world
    from training.evaluate import generate_responses

    tasks = [world.sample_task(rng) for _ in range(n_prompts)]
    prompts = [user(t.prompt) for t in tasks]
    columns = [generate_responses(model, tok, prompts, max_new_tokens=48, batch_size=64, do_sample=False)]
    columns += [
        generate_responses(model, tok, prompts, max_new_tokens=48, batch_size=64, do_sample=True, seed=seed + j)
        for j in range(k - 1)
    ]
    return tasks, prompts, columns


def sft_start(args) -> tuple:
    """(SFT policy, tokenizer): `--model` if given, else a bootstrap of `--sft-seconds` (saved to `--save-sft`)."""
    from training.evaluate import EvalConfig
    from training.model import load_causal_lm

    if args.model is not None:
        return load_causal_lm(args.model)
    from training.bootstrap import BootstrapConfig, bootstrap
    from training.sft import SFTConfig

    model, tok, _ = bootstrap(
        BootstrapConfig(sft=SFTConfig(max_seconds=args.sft_seconds), eval=EvalConfig(n_per_family=1))
    )
    if args.save_sft is not None:  # reruns with other settings can start from the same SFT policy (--model)
        model.save_pretrained(args.save_sft)
        tok.save_pretrained(args.save_sft)
    return model.eval(), tok
