"""Shared setup for the online-loop tests: a home with a tiny SFT policy as version 1, simulated feedback, tiny
cycle budgets, and real worker / API processes started as subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis
from pydantic import TypeAdapter

from core.config import Settings
from store import feedback as fb
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from workers.cycle_config import OPEN_GATE
from workers.publish import publish_version

ROOT = Path(__file__).resolve().parents[2]
USER_KEYS = "sk-test-alice:alice,sk-test-bob:bob"
ADMIN_KEY = "sk-test-admin"
BODY = TypeAdapter(fb.FeedbackIn)
LIMITS = fb.FeedbackLimits(per_minute=100_000, per_day=1_000_000, max_comment_chars=100)

# Budgets small enough for seconds per cycle on a shared 2-core CPU; the gate is open unless a test closes it.
TINY_CYCLE = {
    "lock_ttl_s": 3.0,
    "reward": {"max_seconds": 3.0, "batch_size": 8},
    "update": {"steps": 2, "seconds": 600.0, "algorithm": "ppo"},  # PPO's own tests: whatever the default is
    "ppo": {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 10, "lr": 1e-3},
    "eval": {"n_per_family": 1, "max_new_tokens": 8},
    "gate": OPEN_GATE,
}


def make_settings(home: Path, redis_url: str, **kw) -> Settings:
    return Settings(
        home=home, redis_url=redis_url, api_keys=USER_KEYS, admin_key=ADMIN_KEY, poll_seconds=0.2, device="cpu", **kw
    )


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        {
            "ALIGND_HOME": str(settings.home),
            "ALIGND_REDIS_URL": settings.redis_url,
            "ALIGND_API_KEYS": USER_KEYS,
            "ALIGND_ADMIN_KEY": ADMIN_KEY,
            "ALIGND_POLL_SECONDS": "0.2",
            "ALIGND_DEVICE": "cpu",
            "ALIGND_TORCH_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            **extra,
        }
    )
    return env


def tiny_overrides(**dotted) -> dict:
    """TINY_CYCLE with dotted-key overrides (`tiny_overrides(**{"gate.min_reward_gain": 1e9})`), as one flat dict."""
    from workers.cycle_config import flatten

    return {**flatten(TINY_CYCLE), **dotted}


def write_cycle_config(home: Path, **dotted) -> dict:
    cfg = tiny_overrides(**dotted)
    home.mkdir(parents=True, exist_ok=True)
    (home / "cycle.json").write_text(json.dumps(cfg))
    return cfg


def publish_tiny(
    r: redis.Redis,
    settings: Settings,
    *,
    seed: int = 0,
    steps: int = 30,
    source: str = "sft",
    parent: int | None = None,
    expected="any",
    fencing_token: int | None = None,
    **meta,
) -> int:
    model, tok = tiny_sft_model("gpt2", seed=seed, steps=steps), tiny_tokenizer()
    meta = {
        "source": source,
        "parent": parent,
        "reward_version": None,
        "feedback": {"events": 0},
        "annotators": ["tests"],
        "metrics": {},
        **meta,
    }
    return publish_version(
        r,
        settings,
        lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
        meta,
        expected_current=expected,
        fencing_token=fencing_token,
    )


def add_completion(r: redis.Redis, a: int, b: int, user: str, versions=(1, 1)) -> CompletionRecord:
    good, bad = f"The answer is {a + b}.", f"The answer is {a + b + 1 + (a % 3)}."
    texts = [good, bad] if random.Random(a * 10 + b).random() < 0.5 else [bad, good]
    rec = CompletionRecord(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        user=user,
        messages=[{"role": "user", "content": f"What is {a} plus {b}?"}],
        choices=[
            ChoiceRecord(index=i, text=t, finish_reason="stop", version=versions[i]) for i, t in enumerate(texts)
        ],
        version=versions[0],
    )
    save_completion(r, rec)
    return rec


def seed_feedback(r: redis.Redis, n: int, seed: int = 0) -> list[fb.FeedbackEvent]:
    """`n` pairwise votes from alice and bob preferring the correct sum (written through the store's own path)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = ("alice", "bob")[i % 2]
        rec = add_completion(r, rng.randrange(10), rng.randrange(10), user)
        winner = 0 if rec.choices[0].text.endswith(f"{_sum(rec)}.") else 1
        body = BODY.validate_python({"completion_id": rec.id, "type": "pairwise", "winner": winner})
        out.append(fb.submit_feedback(r, body, user=user, limits=LIMITS).event)
    return out


def seed_overlap(r: redis.Redis, n: int, contrarian: str = "carol", seed: int = 2) -> None:
    """`n` completions of alice's, each judged by alice and bob (right) and by `contrarian` (wrong) — the third
    through the admin key naming it in `user`, as an annotation tool re-serves overlap items."""
    rng = random.Random(seed)
    for _ in range(n):
        rec = add_completion(r, rng.randrange(10), rng.randrange(10), "alice")
        right = 0 if rec.choices[0].text.endswith(f"{_sum(rec)}.") else 1
        votes = (("alice", None, right), ("alice", "bob", right), ("admin", contrarian, 1 - right))
        for key_user, person, winner in votes:
            vote = {"completion_id": rec.id, "type": "pairwise", "winner": winner, "user": person}
            body = BODY.validate_python(vote)
            fb.submit_feedback(r, body, user=key_user, limits=LIMITS, is_admin=key_user == "admin")


def _sum(rec: CompletionRecord) -> int:
    words = rec.messages[0]["content"].rstrip("?").split()
    return int(words[2]) + int(words[4])


def start_worker(settings: Settings, log_path: Path, **env: str) -> subprocess.Popen:
    """A real Celery worker process on both queues, in its own process group (so a test can kill -9 all of it);
    `env` adds variables (e.g. ALIGND_FAILPOINTS)."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        "train,default",
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "-n",
        f"test-{uuid.uuid4().hex[:6]}@%h",
        "-l",
        "info",
        "--without-gossip",
        "--without-mingle",
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env_for(settings, **env),
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def celery_client(redis_url: str, backend: bool = False):
    """A Celery app that sends tasks and reads results as alignd's own do: Celery's keys under the key prefix."""
    import celery

    from store import keys

    opts = keys.celery_transport_options()
    return celery.Celery(
        broker=redis_url,
        backend=redis_url if backend else None,
        broker_transport_options=opts,
        result_backend_transport_options=opts,
    )


def start_api(settings: Settings, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "alignd.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env_for(settings),
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready in {timeout} s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def chat(client: httpx.Client, content: str = "What is 2 plus 3?", **kw) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **kw},
    )
