"""Simulated users: a pool of programmatic annotators that chat with a running alignd and give feedback over HTTP.

Each simulated user is a `training.annotators.Annotator` (its own style and label noise, AlpacaFarm-style) with its
own API key, so the server records who gave every vote. A user loops: draw a prompt of the built-in world
(`world.sample_task`, the held-out family excluded: it measures generalisation and never reaches the feedback), ask
for n = 1, 2 or 3–4 choices, recover the task from the prompt it sent (`world.task_from_prompt`) and judge the
choices with the world's checkers — a thumb on one, a pairwise verdict on two, a ranking of three or four. A share
of turns are red-teaming: a harmful request, often reworded as a jailbreak, and a ranking of four answers (sampled
at `red_team_temperature`).
Feedback carries a client `feedback_id`, so a retried POST never counts twice, and the OpenAI `user` field.
Overlap: a share of judged completions (`overlap`) is re-served to a second simulated user, as annotation teams
re-serve a share of items to another annotator (gold/overlap items): without items labelled twice, no annotator's
reliability can be estimated (training/reliability.py). The second vote goes through the admin key — the
operator's annotation tool — naming its annotator in `user`; without the admin key there is no overlap.

    alignd simulate --users 8 --minutes 2 --url http://127.0.0.1:8000          # keys from ALIGND_API_KEYS
    alignd simulate --users 8 --minutes 2 --keys keys.json                        # {"users": {key: user}} or key:user
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from training.annotators import Annotator, annotator_pool
from training.world import sample_task, task_from_prompt

FEEDBACK_KINDS = ("thumbs", "pairwise", "rank")
RETRYABLE = {429, 500, 502, 503, 504}


@dataclass
class SimConfig:
    url: str = "http://127.0.0.1:8000"
    users: int = 8  # simulated people; styles are dealt round-robin from `annotators`
    seconds: float = 60.0  # how long to keep chatting
    annotators: str = "balanced,brevity,detail,strict"  # training.annotators styles
    noise: float = 0.25  # label-flip probability; AlpacaFarm's estimate of human disagreement
    concurrency: int = 8  # requests in flight at once: the engine batches them, more only queues on 2 cores
    rate: float | None = None  # chat requests per second over all users (None: as fast as the server answers);
    #                            the demo throttles so that serving leaves CPU to the trainer
    mix: tuple[float, float, float] = (0.2, 0.3, 0.5)  # shares of thumbs (n=1), pairwise (n=2), rank (n=3-4):
    #                                                    a rank of 4 gives 6 comparisons, so ranks carry most signal
    red_team: float = 0.1  # share of turns in which a user red-teams: a harmful request (half of them reworded as a
    #                        jailbreak), four responses ranked. Harm is rare in an SFT model's samples, so the
    #                        ordinary mix shows the reward model too few refusals-vs-compliance to learn that
    #                        harmlessness outranks helpfulness there (Bai et al. 2022 collect red-team data apart)
    red_team_temperature: float = 1.0  # hotter red-teaming surfaces more failures (the SFT model answers 3 % of
    #                                    harmful prompts at 1.0, 11 % at 1.3, 25 % at 1.6) and widened the reward
    #                                    model's refusal-vs-compliance gap 2-3x, but at 1.5 the first cycle's reward
    #                                    model also came to favour refusing ordinary requests (its candidate raised
    #                                    over-caution in both demo runs tried), so the default is what users sample
    max_tokens: int = 48  # built-in answers are under 15 words; room to ramble
    temperature: float = 1.0  # the policy's own distribution: distinct choices to compare
    retries: int = 3  # per request, for 429/5xx/transport errors, with backoff (feedback retries are idempotent)
    timeout_s: float = 120.0  # a chat request may wait behind a batch on a busy CPU
    overlap: float = 0.15  # share of judged completions a second user judges too: ~3 overlap labels per 20 votes
    #                        separate a spammer from 25 %-noise annotators within a demo's few thousand votes
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.red_team <= 1.0:
            raise ValueError(f"red_team is a share of turns in [0, 1], got {self.red_team}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"overlap is a share of judged completions in [0, 1], got {self.overlap}")


def simulated_users(n: int, spec: str, noise: float = 0.25) -> list[Annotator]:
    """`n` annotators with styles dealt round-robin from `spec`, named sim-<style>-<k>."""
    styles = [s.strip() for s in spec.split(",") if s.strip()]
    if n < 1:
        raise ValueError(f"need at least one simulated user, got {n}")
    if not styles:
        raise ValueError(f"empty annotator spec {spec!r}")
    return annotator_pool(",".join(styles[i % len(styles)] for i in range(n)), noise)


def sim_api_keys(users: list[Annotator]) -> dict[str, str]:
    """One API key per simulated user (key → user id), for deployments the demo configures itself."""
    return {f"sk-{a.name}": a.name for a in users}


def api_keys_setting(keys: dict[str, str]) -> str:
    """The ALIGND_API_KEYS form of a key → user map."""
    return ",".join(f"{k}:{u}" for k, u in keys.items())


def read_keys_file(path: Path) -> dict[str, str]:
    """key → user from `alignd keys --json` output / keys.json ({"users": {...}}), a plain JSON map, or
    'key:user' items separated by commas or newlines."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        users = data.get("users", data)
        if isinstance(users, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in users.items()):
            return dict(users)
        raise ValueError(f"{path}: expected {{'users': {{key: user}}}} or {{key: user}}")
    out = {}
    for item in text.replace("\n", ",").split(","):
        key, sep, user = item.strip().partition(":")
        if item.strip() and (not sep or not key or not user):
            raise ValueError(f"{path}: entry {item.strip()!r} is not 'key:user'")
        if sep:
            out[key] = user
    return out


def assign_keys(users: list[Annotator], keyring: dict[str, str]) -> dict[str, str]:
    """annotator name → API key. A key whose user id is the annotator's name goes to it; the others are dealt in
    order. Each simulated user needs a key of its own: the server records the caller's user id as the annotator."""
    by_user = {u: k for k, u in keyring.items()}
    out = {a.name: by_user[a.name] for a in users if a.name in by_user}
    spare = [k for k, u in sorted(keyring.items(), key=lambda kv: kv[1]) if k not in out.values()]
    missing = [a for a in users if a.name not in out]
    if len(spare) < len(missing):
        raise ValueError(
            f"{len(users)} simulated users need {len(users)} distinct API keys, only "
            f"{len(out) + len(spare)} are configured: set ALIGND_API_KEYS on the server (e.g. "
            f"'sk-sim-balanced-1:sim-balanced-1,…') and pass the same keys with --keys FILE"
        )
    out.update({a.name: k for a, k in zip(missing, spare)})
    return out


class Simulation:
    """Simulated users against one alignd URL. `counts()` may be read from another thread while it runs."""

    def __init__(self, cfg: SimConfig, users: list[Annotator], keys: dict[str, str], admin_key: str | None = None):
        self.cfg = cfg
        self.users = users
        self.keys = keys  # annotator name → API key
        self.admin_key = admin_key  # re-serves overlap items; None: no overlap
        # its own stream: overlap draws leave each user's sequence of tasks and verdicts as it is without overlap
        self._overlap_rng = random.Random(f"{cfg.seed}-overlap")
        self._lock = threading.Lock()
        self.requests = 0
        self.feedback: Counter[str] = Counter()
        self.by_user: Counter[str] = Counter()
        self.served: Counter[str] = Counter()  # X-Policy-Version of each answer: shows hot-swaps from outside
        self.first_seen: dict[str, float] = {}  # version → wall time of its first answer (swap latency)
        self.errors: Counter[str] = Counter()
        self.latencies: list[tuple[float, float]] = []  # (monotonic start, seconds) of each answered chat request
        self.overlap = 0  # second votes on a completion (re-served items)
        self.unjudgeable = 0
        self._next_slot = 0.0
        self.started = self.finished = None

    def counts(self) -> dict[str, Any]:
        with self._lock:
            fb = dict(self.feedback)
            return {
                "users": len(self.users),
                "url": self.cfg.url,
                "seconds": round((self.finished or time.monotonic()) - (self.started or time.monotonic()), 1),
                "requests": self.requests,
                "feedback": {**{k: fb.get(k, 0) for k in FEEDBACK_KINDS}, "total": sum(fb.values())},
                "errors": {**dict(self.errors), "total": sum(self.errors.values())},
                "served_versions": dict(sorted(self.served.items(), key=lambda kv: kv[0].zfill(9))),
                "first_seen": dict(self.first_seen),
                "by_user": dict(sorted(self.by_user.items())),
                "unjudgeable": self.unjudgeable,
                "overlap": self.overlap,
                "annotators": {a.name: {"style": a.style, "noise": a.noise} for a in self.users},
            }

    def _count(self, counter: Counter, key: str, n: int = 1) -> None:
        with self._lock:
            counter[key] += n

    async def _pace(self) -> None:
        """Spread chat requests evenly at `cfg.rate` per second over all users."""
        if not self.cfg.rate:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.cfg.rate
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _post(self, client: httpx.AsyncClient, path: str, key: str, body: dict) -> httpx.Response | None:
        """POST with retries on 429/5xx/transport errors; None when it finally failed (counted in errors)."""
        for attempt in range(self.cfg.retries + 1):
            try:
                resp = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
            except httpx.HTTPError as exc:
                if attempt == self.cfg.retries:
                    self._count(self.errors, f"{path}:{type(exc).__name__}")
                    return None
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if resp.status_code in RETRYABLE and attempt < self.cfg.retries:
                retry_after = resp.headers.get("Retry-After", "")
                await asyncio.sleep(float(retry_after) if retry_after.isdigit() else 0.5 * 2**attempt)
                continue
            if resp.status_code >= 400:
                self._count(self.errors, f"{path}:{resp.status_code}")
                return None
            return resp
        return None

    def _feedback(
        self, user: Annotator, kind: str, completion_id: str, prompt: str, texts: list[str], rng: random.Random
    ) -> dict | None:
        task = task_from_prompt(prompt)  # the user judges what it asked for, as a person would
        if task is None:
            return None
        body: dict[str, Any] = {
            "completion_id": completion_id,
            "type": kind,
            "feedback_id": f"{user.name}-{uuid.uuid4().hex}",
            "user": user.name,
        }
        if kind == "thumbs":
            body |= {"choice": 0, "value": user.thumbs(task, texts[0], rng)}
        elif kind == "pairwise":
            body["winner"] = user.compare(task, texts[0], texts[1], rng)
        else:
            body["ranking"] = user.rank(task, texts, rng)
        return body

    async def _user(
        self,
        client: httpx.AsyncClient,
        user: Annotator,
        key: str,
        deadline: float,
        stop: threading.Event | None,
        gate: asyncio.Semaphore,
        rng: random.Random,
    ) -> None:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            try:
                if not await self._turn(client, user, key, gate, rng):
                    return
            except (ValueError, KeyError, TypeError) as exc:  # a malformed answer: count it, keep the user going
                self._count(self.errors, f"bad_response:{type(exc).__name__}")

    async def _turn(
        self, client: httpx.AsyncClient, user: Annotator, key: str, gate: asyncio.Semaphore, rng: random.Random
    ) -> bool:
        """One chat request and its feedback; False when this user should stop (its key is refused)."""
        temperature = self.cfg.temperature
        if rng.random() < self.cfg.red_team:
            task, kind, n = sample_task(rng, "harmful", jailbreak_rate=0.5), "rank", 4
            temperature = self.cfg.red_team_temperature
        else:
            task = sample_task(rng)  # held-out family excluded by default
            kind = rng.choices(FEEDBACK_KINDS, weights=self.cfg.mix)[0]
            n = {"thumbs": 1, "pairwise": 2, "rank": rng.choice((3, 4))}[kind]
        await self._pace()
        async with gate:
            t0 = time.monotonic()  # inside the gate: the server's latency, not the simulation's own queue
            resp = await self._post(
                client,
                "/v1/chat/completions",
                key,
                {
                    "messages": [{"role": "user", "content": task.prompt}],
                    "n": n,
                    "max_tokens": self.cfg.max_tokens,
                    "temperature": temperature,
                    "seed": rng.randrange(2**31),
                    "user": user.name,
                },
            )
            if resp is None:
                if any(k.endswith(":401") for k in self.errors):  # a bad key does not get better by retrying
                    return False
                await asyncio.sleep(0.5)
                return True
            data = resp.json()
            with self._lock:
                self.latencies.append((t0, time.monotonic() - t0))
                self.requests += 1
                version = resp.headers.get("X-Policy-Version", "?")
                self.served[version] += 1
                self.first_seen.setdefault(version, time.time())
            texts = [c["message"]["content"] for c in sorted(data["choices"], key=lambda c: c["index"])]
            body = self._feedback(user, kind, data["id"], task.prompt, texts, rng)
            if body is None:
                with self._lock:
                    self.unjudgeable += 1
                return True
            if await self._post(client, "/v1/feedback", key, body) is not None:
                with self._lock:
                    self.feedback[kind] += 1
                    self.by_user[user.name] += 1
                await self._second_opinion(client, user, kind, data["id"], task.prompt, texts)
        return True

    async def _second_opinion(
        self,
        client: httpx.AsyncClient,
        first: Annotator,
        kind: str,
        completion_id: str,
        prompt: str,
        texts: list[str],
    ) -> None:
        """With probability `overlap`, another user judges the same completion (through the admin key)."""
        others, rng = [u for u in self.users if u is not first], self._overlap_rng
        if not (self.admin_key and others) or rng.random() >= self.cfg.overlap:
            return
        second = rng.choice(others)
        body = self._feedback(second, kind, completion_id, prompt, texts, rng)
        if body is not None and await self._post(client, "/v1/feedback", self.admin_key, body) is not None:
            with self._lock:
                self.feedback[kind] += 1
                self.by_user[second.name] += 1
                self.overlap += 1

    async def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        cfg = self.cfg
        self.started = time.monotonic()
        deadline = self.started + cfg.seconds
        gate = asyncio.Semaphore(cfg.concurrency)
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout_s, limits=limits) as client:
            await asyncio.gather(
                *(
                    self._user(
                        client, u, self.keys[u.name], deadline, stop, gate, random.Random(f"{cfg.seed}-{u.name}")
                    )
                    for u in self.users
                )
            )
        self.finished = time.monotonic()
        return self.counts()


def simulate(
    cfg: SimConfig, keyring: dict[str, str], stop: threading.Event | None = None, admin_key: str | None = None
) -> dict[str, Any]:
    """Run `cfg.users` simulated users for `cfg.seconds` (or until `stop` is set); the final counts."""
    users = simulated_users(cfg.users, cfg.annotators, cfg.noise)
    return asyncio.run(Simulation(cfg, users, assign_keys(users, keyring), admin_key).run(stop))


class BackgroundSimulation:
    """A `Simulation` on its own event loop in a thread (the demo watches `counts()` and stops it)."""

    def __init__(self, cfg: SimConfig, keyring: dict[str, str], admin_key: str | None = None):
        users = simulated_users(cfg.users, cfg.annotators, cfg.noise)
        self.sim = Simulation(cfg, users, assign_keys(users, keyring), admin_key)
        self.stop_event = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="simulated-users", daemon=True)

    def _run(self) -> None:
        try:
            self.result = asyncio.run(self.sim.run(self.stop_event))
        except BaseException as exc:  # reported by stop(); the demo must not hang on a dead thread
            self.error = exc

    def start(self) -> BackgroundSimulation:
        self.thread.start()
        return self

    def counts(self) -> dict[str, Any]:
        return self.sim.counts()

    def stop(self, timeout: float = 180.0) -> dict[str, Any]:
        self.stop_event.set()
        self.thread.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"simulated users failed: {self.error!r}") from self.error
        return self.result or self.sim.counts()
