"""workers/gate_stage.py: the three evaluations the gate compares (candidate, current policy, SFT reference) give
the same results two at a time on two threads (`gate.beside`) as one after the other, and really run on two."""

from __future__ import annotations

import threading

import pytest
import torch

import workers.gate_stage as gate_stage
from store import registry
from store.lock import FencedLock
from tests.workers.helpers import make_settings, publish_tiny, seed_feedback
from tests.workers.test_cycle_algorithms import algorithm_cycle
from workers import reward_stage, update
from workers.cycle import run_cycle
from workers.job import Job


def _numbers(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if isinstance(v, float)}


def test_the_gate_evaluates_the_same_on_two_threads_as_one_after_the_other(r, redis_url, tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    seed_feedback(r, 16)
    assert run_cycle(r, settings, algorithm_cycle("dpo"))["status"] == "published"  # version 2, reward model 1
    assert registry.current_version(r) == 2 and registry.current_reward_version(r) == 1

    seen: list[tuple[str, int]] = []
    real = gate_stage.evaluate_metrics

    def observed(model, tok, ecfg, **kw):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        assert not torch.is_grad_enabled()
        return real(model, tok, ecfg, **kw)

    monkeypatch.setattr(gate_stage, "evaluate_metrics", observed)
    verdicts = {}
    with FencedLock(r, "gate-test", ttl_ms=60_000) as lock:  # one token: one evaluation set and sampling seed
        for beside in (False, True):
            cfg = algorithm_cycle("dpo", **{"gate.beside": beside, "eval.n_per_family": 4, "eval.max_new_tokens": 12})
            # from version 2, whose reference is version 1: candidate, parent and reference are three policies
            job = Job(r, settings, cfg, lock, start_version=2, ref_version=1, trigger="cli")
            cand = update.load_policy(job, lora=False)
            cand.info = {"algorithm": "dpo", "steps": 1}
            seen.clear()
            verdicts[beside] = gate_stage.run(job, reward_stage.current(job), cand)
            if beside:
                assert len(seen) == 3 and all(name.startswith("beside") for name, _ in seen)
                assert len({name for name, _ in seen}) == 2  # two at a time
                assert all(n == max(1, torch.get_num_threads() // 2) for _, n in seen)
            else:
                assert [name for name, _ in seen] == [threading.current_thread().name] * 3

    one, two = verdicts[False], verdicts[True]
    assert one.passed == two.passed and one.reasons == two.reasons
    for key in ("candidate", "parent"):
        a, b = getattr(one, key), getattr(two, key)
        assert a["outcomes"] == b["outcomes"]  # the same sampled answers, judged the same
        assert _numbers(a) == pytest.approx(_numbers(b), rel=1e-4, abs=1e-6)
    assert one.numbers.keys() == two.numbers.keys()
