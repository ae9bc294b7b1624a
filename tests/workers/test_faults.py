"""Faults at every stage boundary of the training cycle: feedback is never lost and never used twice, and the next
cycle recovers by itself.

Process deaths are real: a Celery worker process stopped at a named failpoint (workers/failpoints.py, a `sleep`)
is killed with SIGKILL, parent and pool child at once; the soft time limit is Celery's own, firing inside the
checkpoint write; the full disk is a real tmpfs filled up while the cycle gates (a failpoint raising ENOSPC where
tmpfs cannot be mounted). Exceptions at the other boundaries run in-process. Each test audits the registry:

* used  = Σ published versions' provenance `feedback.events` + Σ recorded gate failures' `feedback.events`
* acked = distinct events the consumer group has acknowledged (from the stream and the pending list, not a counter)
* used == acked == distinct ids in the settled records; no id in two records (twice = 0); every event either in
  one record or still waiting for a cycle (lost = 0).

Run with `-s` to print the fault matrix (one MATRIX line per cell).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import feedback as fb
from store import keys, registry
from tests.workers.helpers import (
    ROOT,
    celery_client,
    make_settings,
    publish_tiny,
    seed_feedback,
    start_worker,
    stop,
    tiny_overrides,
    wait_for,
    write_cycle_config,
)
from training.checkpoint import verify_checkpoint
from workers import failpoints
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig
from workers.failpoints import FailpointError


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


def audit(r) -> dict:
    """The accounting identity over the registry and the consumer group (see the module docstring)."""
    stream = keys.feedback_stream()
    cycle_events = r.hgetall(keys.registry_cycle_events())
    published = [
        m for m in registry.list_versions(r) if m.get("cycle") is not None and registry.was_published(r, m["version"])
    ]
    failures = [json.loads(v) for k, v in cycle_events.items() if k.endswith(":gate_failed")]
    used = sum(m["feedback"]["events"] for m in published) + sum(f["feedback"]["events"] for f in failures)
    records = [json.loads(v) for k, v in cycle_events.items() if k.endswith(":feedback_ids")]
    ids = [i for rec in records for i in rec]
    all_ids = [eid for eid, _ in r.xrange(stream)]
    pending = {p["message_id"] for p in r.xpending_range(stream, fb.GROUP, "-", "+", 1_000_000)}
    group = next(g for g in r.xinfo_groups(stream) if g["name"] == fb.GROUP)
    delivered_to = _stream_key(group["last-delivered-id"])
    acked = {i for i in all_ids if i not in pending and _stream_key(i) <= delivered_to}
    waiting = {i for i in all_ids if i in pending or _stream_key(i) > delivered_to}
    return {
        "used": used,
        "acked": len(acked),
        "twice": len(ids) - len(set(ids)),
        "lost": len(set(all_ids) - set(ids) - waiting),
        "acked_unrecorded": len(acked - set(ids)),
        "waiting": len(waiting),
        "total": len(all_ids),
    }


def assert_exactly_once(r) -> dict:
    a = audit(r)
    assert a["twice"] == 0 and a["lost"] == 0 and a["acked_unrecorded"] == 0, a
    assert a["used"] == a["acked"] == a["total"] - a["waiting"], a
    return a


def matrix(fault: str, moment: str, sees: str, a: dict, recover_s: float) -> None:
    print(
        f"\nMATRIX | {fault} | {moment} | {sees} | lost {a['lost']} | twice {a['twice']} | "
        f"recovered in {recover_s:.1f} s"
    )


@pytest.fixture
def home(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    write_cycle_config(settings.home)
    publish_tiny(r, settings)
    return settings


def tiny(**dotted) -> CycleConfig:
    return CycleConfig.from_dict(tiny_overrides(**dotted))


def recover_and_check(
    r, settings, t_fault: float, taken: int, used_before: bool, settled_before: bool = False
) -> tuple[dict, float]:
    """The next cycle, on 2 new events: it settles the dead cycle's record by itself (unless that cycle settled it
    on its way out) and publishes, on the 2 new events plus the `taken` ones if they were not used."""
    seed_feedback(r, 2, seed=7)
    wait_for(lambda: not r.exists(keys.lock("train")), 30, what="the dead cycle's lock to expire")
    report = run_cycle(r, settings, tiny())
    elapsed = time.monotonic() - t_fault
    expected = (
        {"acked": 0, "released": 0}
        if settled_before
        else {"acked": taken, "released": 0}
        if used_before
        else {"acked": 0, "released": taken}
    )
    assert report["recovered"] == expected, report["recovered"]
    assert report["status"] == "published", report
    assert report["feedback"]["events"] == (2 if used_before else taken + 2)
    assert fb.unconsumed_count(r) == 0 and fb.pending_count(r) == 0 and r.hlen(keys.train_inflight()) == 0
    return assert_exactly_once(r), elapsed


def wait_log(path: Path, text: str, timeout: float) -> None:
    wait_for(lambda: path.exists() and text in path.read_text(errors="replace"), timeout, what=repr(text))


# ---------------------------------------------------------------------------------------------------- fast


def test_failpoints_parse_and_do_nothing_when_unset():
    failpoints.hit("", "after_publish")  # production: no spec, no effect
    failpoints.hit("after_ppo=raise", "after_publish")  # another point: no effect
    assert failpoints.parse("after_publish=kill, in_publish=sleep:5") == {
        "after_publish": ("kill", ""),
        "in_publish": ("sleep", "5"),
    }
    with pytest.raises(FailpointError):
        failpoints.hit("after_ppo=raise", "after_ppo")
    with pytest.raises(OSError) as info:
        failpoints.hit("in_checkpoint=raise:ENOSPC", "in_checkpoint")
    assert info.value.errno == 28
    for bad, says in (
        ("after_lunch=kill", "unknown point"),
        ("after_ppo=explode", "unknown action"),
        ("after_ppo=sleep", "could not convert"),
        ("after_ppo=raise:ENOPE", "errno name"),
    ):
        with pytest.raises(ValueError, match=says):
            failpoints.parse(bad)


def test_kill_action_sigkills_its_own_process():
    code = "from workers.failpoints import hit\nhit('after_publish=kill', 'after_publish')\nprint('survived')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout


def test_a_misspelt_failpoint_fails_before_any_feedback_is_taken(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url, failpoints="after_lunch=kill")
    publish_tiny(r, settings)
    seed_feedback(r, 3)
    with pytest.raises(ValueError, match="unknown point 'after_lunch'"):
        run_cycle(r, settings, tiny())
    assert fb.unconsumed_count(r) == 3 and fb.pending_count(r) == 0


# ---------------------------------------------------------------------------------------------------- in-process


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, gate_open, used",
    [
        ("after_publish", True, True),  # an exception between publish and ack must not release used events
        ("after_gate_failed", False, True),  # same, on the gate-failure path
        ("after_ppo", True, False),
    ],
)
def test_an_exception_at_a_boundary_settles_by_what_happened(r, redis_url, tmp_path, point, gate_open, used):
    settings = make_settings(tmp_path / "home", redis_url, failpoints=f"{point}=raise")
    publish_tiny(r, settings)
    seed_feedback(r, 8)
    cfg = tiny() if gate_open else tiny(**{"gate.min_reward_gain": 1e9})
    with pytest.raises(FailpointError):
        run_cycle(r, settings, cfg)
    t_fault = time.monotonic()
    assert r.hlen(keys.train_inflight()) == 0  # the cycle settled itself on the way out
    assert fb.pending_count(r) == (0 if used else 8)
    assert registry.current_version(r) == (2 if point == "after_publish" else 1)
    settled = registry.find_events(r, event="cycle_settled")[0]
    assert settled["used"] is used and settled["events"] == 8 and "FailpointError" in settled["why"]
    a = assert_exactly_once(r)
    sees = {
        "after_publish": "v2 served; cycle raised; events acked by the cycle's own settle",
        "after_gate_failed": "gate failure recorded; cycle raised; events acked",
        "after_ppo": "cycle raised; v1 serves; events returned to the queue",
    }[point]
    recovered = settings.model_copy(update={"failpoints": ""})
    seed_feedback(r, 2, seed=7)
    report = run_cycle(r, recovered, tiny())
    assert report["status"] == "published" and report["feedback"]["events"] == (2 if used else 10)
    assert report["recovered"] == {"acked": 0, "released": 0}  # nothing was left for recovery
    a = assert_exactly_once(r)
    matrix("exception", point, sees, a, time.monotonic() - t_fault)


@pytest.mark.slow
def test_full_disk_while_writing_the_checkpoint(r, redis_url, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(root)], capture_output=True).returncode
        == 0
    )
    try:
        settings = make_settings(
            tmp_path / "home",
            redis_url,
            checkpoint_root=root,
            failpoints="" if mounted else "in_checkpoint=raise:ENOSPC",
        )
        publish_tiny(r, settings)
        seed_feedback(r, 10)
        filler = root / "filler"

        def fill_disk(stage: str, info: dict) -> None:
            if stage == "gate" and mounted:  # between the reward checkpoint and the policy's: the disk fills up
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 20))
                            f.flush()
                    except OSError:
                        pass

        report = run_cycle(r, settings, tiny(), progress=fill_disk)
        t_fault = time.monotonic()
        assert report["status"] == "publish_failed", report
        assert "No space left on device" in report["reason"] and str(root) in report["reason"]
        assert registry.find_events(r, event="publish_failed")[0]["reason"] == report["reason"]
        assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # the temporary folder is gone
        assert registry.current_version(r) == 1 and [m["version"] for m in registry.list_versions(r)] == [1]
        verify_checkpoint(settings.checkpoint(registry.get_version(r, 1)["path"]))  # the old version still serves
        assert fb.unconsumed_count(r) == 10 and r.hlen(keys.train_inflight()) == 0  # released, not lost
        assert_exactly_once(r)

        filler.unlink(missing_ok=True)  # the operator frees space; the next cycle needs nothing else
        recovered = settings.model_copy(update={"failpoints": ""})
        again = run_cycle(r, recovered, tiny())
        assert again["status"] == "published" and again["feedback"]["events"] == 10, again
        a = assert_exactly_once(r)
        matrix(
            "disk full" + (" (tmpfs)" if mounted else " (failpoint ENOSPC)"),
            "checkpoint write",
            "cycle result publish_failed with the reason; v1 serves; events back in the queue",
            a,
            time.monotonic() - t_fault,
        )
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False)


# ---------------------------------------------------------------------------------------------------- workers


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_reward", "after_ppo", "after_gate", "after_publish"])
def test_kill_9_of_the_worker_at_a_stage_boundary(r, redis_url, home, tmp_path, point):
    seed_feedback(r, 10)
    log_path = tmp_path / "worker.log"
    worker = start_worker(home, log_path, ALIGND_FAILPOINTS=f"{point}=sleep:600")
    sender = celery_client(redis_url)
    try:
        sender.send_task("alignd.train_cycle", queue="train")
        wait_log(log_path, f"failpoint {point} hit", 240)
    finally:
        stop(worker, signal.SIGKILL)  # parent and pool child at once, while the cycle stands at the failpoint
        sender.close()
    t_fault = time.monotonic()
    published = point == "after_publish"
    assert registry.current_version(r) == (2 if published else 1)
    assert fb.pending_count(r) == 10 and r.hlen(keys.train_inflight()) == 1  # nothing settled: the worker is gone
    assert not [p for p in home.checkpoints_dir.iterdir() if p.name.startswith(".tmp-")]
    a, elapsed = recover_and_check(r, home, t_fault, 10, used_before=published)
    sees = (
        "v2 published and served; the task never returns (its message is redelivered after the visibility "
        "timeout and answers busy or runs a new cycle)"
        if published
        else "v1 keeps serving; the task never returns"
    )
    matrix("kill -9 worker", point, sees, a, elapsed)


@pytest.mark.slow
def test_soft_time_limit_inside_publish(r, redis_url, home, tmp_path):
    seed_feedback(r, 10)
    log_path = tmp_path / "worker.log"
    worker = start_worker(home, log_path, ALIGND_FAILPOINTS="in_publish=sleep:600")
    sender = celery_client(redis_url, backend=True)
    soft = 60
    try:
        task = sender.send_task("alignd.train_cycle", queue="train", soft_time_limit=soft, time_limit=soft + 120)
        result = sender.AsyncResult(task.id)
        result.get(timeout=soft + 120, propagate=False)
        t_fault = time.monotonic()
        assert "failpoint in_publish hit" in log_path.read_text(errors="replace"), (
            f"the cycle did not reach publish within the {soft} s soft limit (machine too loaded?)"
        )
        assert result.state == "FAILURE" and type(result.result).__name__ == "SoftTimeLimitExceeded", result.result
    finally:
        stop(worker)
        sender.close()
    assert registry.current_version(r) == 1 and [m["version"] for m in registry.list_versions(r)] == [1]
    assert not [p for p in home.checkpoints_dir.iterdir() if p.name.startswith(".tmp-")]
    assert r.hlen(keys.train_inflight()) == 0  # the cycle settled its events itself, on the way out
    assert fb.pending_count(r) == 10  # returned to the queue, not acknowledged
    failed = registry.find_events(r, event="cycle_failed", task=task.id)
    assert failed and "SoftTimeLimitExceeded" in failed[0]["reason"]
    assert_exactly_once(r)
    a, elapsed = recover_and_check(r, home, t_fault, 10, used_before=False, settled_before=True)
    matrix(
        "Celery soft time limit",
        "inside publish (checkpoint write)",
        "task FAILURE SoftTimeLimitExceeded, cycle_failed event; v1 serves",
        a,
        elapsed,
    )
