"""Preference optimisation straight from labels — DPO or KTO (training/preference.py) — as a gated publish.

The policy trains from the current version against its SFT ancestor (the reference of every version in its
lineage), on a preference file's labels or on all comparisons and thumbs in Redis; no reward model is involved. The
result is checked by the cycle's gate (workers/gate.py) on the cycle's held-out evaluation prompts — harmful
compliance, over-caution, checker score, KL, degeneracy, length; with no reward model there is no reward-gain test,
so the world's checkers decide — and published under the training lock, fenced by its token and by the version it
started from. A refusal is recorded as a `gate_failed` event.

    alignd train dpo [--data FILE] [--seconds 60]       # or: alignd train kto …
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import redis

from core import names
from core.config import Settings
from store import registry
from store.comparisons import all_comparisons
from store.lock import FencedLock
from workers.cycle_config import load_cycle_config
from workers.gate import config_for, evaluate, gate, without_outcomes
from workers.publish import publish_version

ALGORITHMS = ("dpo", "kto")


def run_preference(
    r: redis.Redis,
    settings: Settings,
    algorithm: str,
    cfg,
    *,
    data: tuple[list[dict], list[dict], dict[str, Any]] | None = None,
    gate: bool = True,
) -> dict[str, Any]:
    """Train with `algorithm` ("dpo" | "kto", `cfg` its DPOConfig/KTOConfig) on `data` = (comparison dicts, rated
    dicts, provenance) or all feedback; gate unless `gate` is off; publish. Raises ValueError on unusable data,
    store.lock.LockBusy when another run trains."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    if data is None:
        comparisons, rated = all_comparisons(r)
        source: dict[str, Any] = {"redis": True, "comparisons": len(comparisons), "rated": len(rated)}
    else:
        comparisons, rated, source = data
    current = registry.current_version(r)
    if current is None:
        from workers.cycle import CycleError

        raise CycleError("no policy version is registered: run `alignd bootstrap` first")
    ccfg = load_cycle_config(settings)
    with FencedLock(r, names.TRAIN_LOCK, ttl_ms=int(ccfg.lock_ttl_s * 1000)) as lock:
        return _train_gate_publish(r, settings, algorithm, cfg, ccfg, lock, current, comparisons, rated, source, gate)


def _train_gate_publish(
    r, settings, algorithm, cfg, ccfg, lock, current, comparisons, rated, source, use_gate: bool
) -> dict[str, Any]:
    from training.data import Comparison, Rated
    from training.lora import load_policy
    from training.preference import train_dpo, train_kto

    device = settings.torch_device()
    ref_version = registry.reference_version(r, current)
    parent_path = settings.checkpoint(registry.get_version(r, current)["path"])
    policy, tok = load_policy(parent_path, device, resolve_base=settings.checkpoint)
    reference, _ = load_policy(settings.checkpoint(registry.get_version(r, ref_version)["path"]), device)
    items_c, items_r = [Comparison.from_dict(c) for c in comparisons], [Rated.from_dict(x) for x in rated]
    if algorithm == "dpo":
        policy, metrics = train_dpo(cfg, policy, tok, items_c, reference=reference)
    else:
        policy, metrics = train_kto(cfg, policy, tok, items_c, items_r, reference=reference)
    report: dict[str, Any] = {
        "parent": current,
        "reference_version": ref_version,
        "data": source,
        "config": asdict(cfg),
        "metrics": metrics,
    }
    checked = None
    if use_gate:
        checked = _gate(
            policy, tok, parent_path, reference, ref_version == current, ccfg, lock.token, device, settings, algorithm
        )
        if not checked["passed"]:
            registry.record_event(
                r, "gate_failed", source=algorithm, parent=current, reasons=checked["reasons"], gate=checked["numbers"]
            )
            return {
                "status": "gate_failed",
                "reasons": checked["reasons"],
                "gate": checked["numbers"],
                "current": current,
                **report,
            }
    annotators = sorted({x.annotator for x in items_c + items_r if x.annotator})
    meta = {
        "source": algorithm,
        "parent": current,
        "reference_version": ref_version,
        "reward_version": None,
        "data": source,
        "feedback": {"events": 0},
        "annotators": annotators,
        "metrics": checked["candidate"] if checked else {},
        "gate": checked["numbers"] if checked else "skipped (--no-gate)",
        algorithm: {"config": asdict(cfg), "metrics": metrics},
    }
    version = publish_version(
        r,
        settings,
        lambda d: (policy.save_pretrained(d), tok.save_pretrained(d)),
        meta,
        expected_current=current,
        fencing_token=lock.token,
    )
    return {"status": "published", "version": version, **report}


def _gate(
    policy,
    tok,
    parent_path,
    reference,
    reference_is_parent: bool,
    ccfg,
    token: int,
    device: str,
    settings: Settings,
    algorithm: str,
) -> dict[str, Any]:
    """The cycle's gate on the candidate vs the policy it started from, on the cycle's held-out prompts (seed: the
    eval section's base + the lock token, as a cycle's); the reward-gain condition is off (no reward model)."""
    from training.lora import load_policy

    ecfg = replace(ccfg.eval, seed=ccfg.eval.seed + token)
    candidate = evaluate(policy, tok, ecfg, reference=reference)
    parent, _ = load_policy(parent_path, device, resolve_base=settings.checkpoint)
    parent_eval = evaluate(parent, tok, ecfg, reference=reference)
    ref_eval = parent_eval if reference_is_parent else evaluate(reference, tok, ecfg, reference=reference)
    for m in (candidate, parent_eval, ref_eval):
        m["reward_mean"] = 0.0
    passed, reasons, numbers = gate(candidate, parent_eval, config_for(ccfg.gate, algorithm), reference=ref_eval)
    return {
        "passed": passed,
        "reasons": reasons,
        "numbers": {**numbers, "eval_seed": ecfg.seed},
        "candidate": without_outcomes(candidate),
    }
