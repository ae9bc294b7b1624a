"""Gate stage: the candidate against the current policy (and the SFT reference) on a fresh held-out set.

The checks are workers/gate.py's; this stage evaluates the three policies on the same prompts (two at a time on the
CPU, `gate.beside`) and, when PPO's candidate fails, gates the policy from halfway through PPO the same way and takes
it if it passes (PPO against a fixed reward model tends to overshoot into its errors late). DPO and KTO never optimise
the reward model, so their gate does not ask them to raise it (`gate.config_for`); without a reward model there is no
reward score to compare.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from core.threads import two_at_once
from workers.gate import config_for, gate
from workers.gate import evaluate as evaluate_metrics
from workers.job import Job
from workers.update import Candidate, restore, snapshot


@dataclass
class Verdict:
    """The gate's result: whether the candidate may be published, why not, and the numbers it compared."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)  # the candidate's evaluation (with per-prompt outcomes)
    parent: dict[str, Any] = field(default_factory=dict)  # the current policy's on the same prompts
    fallback_steps: int | None = None  # PPO steps of the halfway policy published in the full run's place
    skipped: bool = False  # `--no-gate`: nothing was evaluated


def run(job: Job, rewards, cand: Candidate) -> Verdict:
    """Evaluate and gate `cand` (its policy is the halfway one afterwards if the fallback was taken)."""
    import torch

    if not job.gated:
        return Verdict(True, skipped=True)
    rewards.load(job)
    # a fresh evaluation set (and sampling seed) per run, shared by every policy (workers/cycle_config.py)
    ecfg = replace(job.cfg.eval, seed=job.cfg.eval.seed + job.token)

    scoring = threading.Lock()

    def reward_fn(prompts, responses):
        with scoring:  # one reward model and tokenizer for the evaluations that run at once (gate.beside)
            return rewards.score(prompts, responses)

    def evaluate(model, tok) -> dict[str, Any]:
        scorer = None if rewards.score is None else reward_fn
        m = evaluate_metrics(model, tok, ecfg, reference=cand.reference, reward_fn=scorer)
        return m if rewards.score is not None else m | {"reward_mean": 0.0}  # no reward model: no gain to measure

    gcfg = config_for(job.cfg.gate, cand.info["algorithm"])
    with torch.no_grad():
        candidate, parent, reference = _evaluations(job, cand, evaluate)
        passed, reasons, numbers = gate(candidate, parent, gcfg, reference=reference)
        verdict = Verdict(passed, reasons, numbers, candidate, parent)
        if not passed and cand.halfway is not None and cand.halfway[0] < cand.info["steps"]:
            _fallback(cand, verdict, lambda: evaluate(cand.policy, cand.tokenizer), gcfg, reference)
    verdict.numbers["eval_seed"] = ecfg.seed
    if verdict.passed:
        cand.info["published_steps"] = verdict.fallback_steps or cand.info["steps"]
    job.progress("gate", {"passed": verdict.passed, "reasons": verdict.reasons, **verdict.numbers})
    return verdict


def _evaluations(job: Job, cand: Candidate, evaluate) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The candidate's, the current policy's and the SFT reference's evaluations on the same prompts (the parent's
    stands for the reference's when the cycle started from the reference). With `gate.beside`, on the CPU, for a
    full-weight candidate: two at a time on two threads (core/threads.py `two_at_once`), each with a tokenizer of its
    own (a fast tokenizer refuses two threads at once: "Already borrowed")."""
    import copy

    import torch

    same = job.ref_version == job.start_version
    runs = {
        "candidate": lambda tok: evaluate(cand.policy, tok),
        "parent": lambda tok: _parent_evaluation(job, cand, evaluate, tok),
    }
    if not same:
        runs["reference"] = lambda tok: evaluate(cand.reference, tok)
    if not job.cfg.gate.beside or cand.lora or job.device.startswith("cuda"):
        done = {name: run(cand.tokenizer) for name, run in runs.items()}
    else:

        def on_a_thread(run):
            tokenizer = copy.deepcopy(cand.tokenizer)

            def task():
                with torch.no_grad():  # grad mode is per thread
                    return run(tokenizer)

            return task

        done = two_at_once({name: on_a_thread(run) for name, run in runs.items()})
    return done["candidate"], done["parent"], done["parent"] if same else done["reference"]


def _parent_evaluation(job: Job, cand: Candidate, evaluate, tokenizer) -> dict[str, Any]:
    """The current version on the same prompts: for LoRA the same base with the adapter it started from, else the
    version loaded beside the candidate (and freed after)."""
    from training.lora import load_policy

    if cand.lora:
        trained = snapshot(cand.policy)
        restore(cand.policy, cand.parent_adapter)
        try:
            return evaluate(cand.policy, tokenizer)
        finally:
            restore(cand.policy, trained)
    parent, _ = load_policy(job.current_path, job.device, resolve_base=job.settings.checkpoint)
    return evaluate(parent, tokenizer)


def _fallback(cand: Candidate, verdict: Verdict, evaluate, gcfg, reference: dict[str, Any]) -> None:
    """Gate the policy from halfway through PPO; if it passes, it replaces the candidate (in `cand` and `verdict`).
    PPO against a fixed reward model can overshoot into its errors late in the run (harmful compliance rose in a
    third of demo cycles); the halfway policy is checked by the same gate on the same prompts."""
    half_steps, weights = cand.halfway
    restore(cand.policy, weights)
    half = evaluate()
    passed, reasons, numbers = gate(half, verdict.parent, gcfg, reference=reference)
    if not passed:
        verdict.reasons = verdict.reasons + [f"(halfway, after {half_steps} steps: {'; '.join(reasons)})"]
        return
    full = {"steps": half_steps, "of": cand.info["steps"], "full_run_reasons": verdict.reasons}
    verdict.numbers = {**numbers, "fallback": full | {"full_run": verdict.numbers}}
    verdict.passed, verdict.reasons, verdict.candidate, verdict.fallback_steps = True, [], half, half_steps
