"""The loop with vLLM generating every token: a real vLLM CPU server (its own venv), real `alignd serve` processes, a
real Redis and a real training cycle. No mock of vLLM's API anywhere.

vLLM comes from `scripts/install-vllm` (CI runs it); without it these tests skip, unless ALIGND_TEST_REQUIRE_VLLM=1
(CI) makes a missing vLLM a failure. One `alignd serve --workers 2` deployment (one vLLM server shared by both API
processes) serves the whole module, in float32 so its greedy tokens can be compared with alignd's own engine's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.redis_server import free_port
from service.engine import Engine, Policy, SamplingParams
from store import registry
from store.client import connect
from store.completions import get_completion
from tests.utils.tiny import tiny_model, tiny_tokenizer
from tests.workers.helpers import ADMIN_KEY, ROOT, TINY_CYCLE, env_for, make_settings, stop, wait_for
from training.lora import LoRAConfig, add_adapter, save_adapter
from workers.publish import publish_version

pytestmark = pytest.mark.slow

KEY = "sk-test-alice"
PROMPTS = ["What is 2 plus 3?", "Say a number.", "Say a word.", "Hello, how are you?", "What is 7 plus 1?"]


def _vllm_python() -> str:
    found = os.environ.get("ALIGND_TEST_VLLM_PYTHON") or str(ROOT / ".vllm-venv" / "bin" / "python")
    if Path(found).exists():
        return found
    if os.environ.get("ALIGND_TEST_REQUIRE_VLLM") == "1":
        pytest.fail(f"no vLLM python at {found}: run scripts/install-vllm")
    pytest.skip("vLLM is not installed (scripts/install-vllm)")


class Deployment:
    """`alignd serve --workers 2` with ALIGND_ENGINE=vllm, on a tiny SFT Llama registered as version 1."""

    def __init__(self, home: Path, redis_url: str, vllm_python: str):
        self.settings = make_settings(home, redis_url)
        self.r = connect(redis_url)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.env = env_for(
            self.settings,
            ALIGND_ENGINE="vllm",
            ALIGND_VLLM_PYTHON=vllm_python,
            ALIGND_DTYPE="float32",
            ALIGND_ARENA="true",
            ALIGND_VLLM_CPU_KV_CACHE_GIB="1",
            ALIGND_SMOKE_TEST_TIMEOUT_S="60",
            ALIGND_VLLM_ARGS="--enable-log-requests",  # vLLM logs each abort (it has no metric of them)
            # the load test sends hundreds of fast 503s a minute: rate limits are not what it tests
            ALIGND_CHAT_RATE_PER_MINUTE="100000",
            ALIGND_KEY_CHAT_RATE_PER_MINUTE="100000",
            ALIGND_KEY_TOKENS_PER_MINUTE="100000000",
        )
        self.log = home / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "alignd.cli", "serve", "--port", port, "--workers", "2"]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self.ready, 240, interval=0.5, what=f"alignd serve over vLLM (log: {self.log})")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"alignd serve exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, key: str = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def vllm_url(self) -> str:
        return httpx.get(f"{self.url}/readyz", timeout=5).json()["engine"]["url"]

    def served_by_every_process(self, version: int) -> bool:
        """Both API processes (told apart by pid) report `version` as current."""
        seen: dict[int, int] = {}
        for _ in range(30):
            body = httpx.get(f"{self.url}/readyz", timeout=5).json()
            seen[body["pid"]] = body["policy_version"]
            if len(seen) == 2:
                break
        return len(seen) == 2 and set(seen.values()) == {version}


def tiny_llama_base(home: Path) -> Path:
    """A random tiny Llama with the tiny tokenizer (vLLM 0.32 has LoRA for Llama, not for GPT-2). Untrained on
    purpose: its greedy answers run to max_tokens without an end-of-sequence, so a test can hang up mid-answer."""
    path = home / "base-llama"
    model, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deployment(redis_url, tmp_path_factory):
    python = _vllm_python()
    home = tmp_path_factory.mktemp("vllm-home")
    d = Deployment(home, redis_url, python)
    d.r.flushdb()
    base = tiny_llama_base(home)
    boot = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "bootstrap", "--base", str(base)],
        cwd=ROOT,
        env=d.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert boot.returncode == 0, boot.stderr[-2000:]
    d.start()
    yield d
    stop(d.proc, timeout=60)
    assert not _vllm_pids(d), "alignd serve left its vLLM server running"


def _chat(client: httpx.Client, content: str, **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def _vllm_pids(d: Deployment) -> list[int]:
    """The vLLM API server of this deployment (its command line names the base folder under the home)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" in cmd and str(d.settings.home) in cmd:
            pids.append(int(entry.name))
    return pids


def _aborted_in_vllm(d: Deployment) -> int:
    """Requests vLLM logged as aborted (ALIGND_VLLM_ARGS=--enable-log-requests)."""
    log = (d.settings.home / "logs" / "vllm.log").read_text(errors="replace")
    return sum(len(m.split(",")) for m in re.findall(r"Aborted request\(s\) ([^ ]+?)\.?$", log, re.M))


def test_chat_pairs_streaming_and_feedback_through_vllm(deployment):
    d = deployment
    with d.client() as c:
        r = _chat(c, "What is 2 plus 3?", n=2, temperature=1.0, seed=7)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["system_fingerprint"] == "alignd-v1" and r.headers["x-policy-version"] == "1"
        assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] >= 2
        again = _chat(c, "What is 2 plus 3?", n=2, temperature=1.0, seed=7).json()
        assert [ch["message"]["content"] for ch in again["choices"]] == [
            ch["message"]["content"] for ch in body["choices"]
        ], "the same seed must give the same answers"
        # the completion is recorded: feedback on it is accepted and lands in the log
        vote = c.post("/v1/feedback", json={"completion_id": body["id"], "type": "pairwise", "winner": 0})
        assert vote.status_code in (200, 201), vote.text
        rec = get_completion(d.r, body["id"])
        assert rec is not None and [ch.version for ch in rec.choices] == [1, 1]

        # streaming: chunks, the usage chunk, [DONE]; the completion is recorded before [DONE]
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 6, "stream": True},
        ) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert chunks[0]["system_fingerprint"] == "alignd-v1"
        assert get_completion(d.r, chunks[0]["id"]) is not None
        assert chunks[-1]["usage"]["completion_tokens"] >= 1

        # max_tokens bounds what vLLM generates; a stop string cuts the text before it
        long = _chat(c, "Say a number.", max_tokens=3, temperature=1.0, seed=1).json()
        assert long["usage"]["completion_tokens"] <= 3
        full = long["choices"][0]["message"]["content"]
        if len(full) > 2:
            cut = _chat(c, "Say a number.", max_tokens=3, temperature=1.0, seed=1, stop=[full[1:3]]).json()
            assert cut["choices"][0]["message"]["content"] == full[: full.index(full[1:3])]

        # ops see the engine and vLLM's own gauges in alignd's /metrics
        scraped = c.get("/metrics").text
        assert re.search(r"^alignd_engine_up 1\.0$", scraped, re.M), scraped[-2000:]
        assert re.search(r"^alignd_vllm_kv_cache_usage ", scraped, re.M)
        assert re.search(r"^alignd_vllm_requests_running ", scraped, re.M)

        # bad input changes nothing and is answered in the OpenAI error shape
        bad = c.post("/v1/chat/completions", json={"messages": [], "max_tokens": 4})
        assert bad.status_code == 422 and "error" in bad.json()


def test_vllm_greedy_tokens_match_alignd_engine(deployment):
    """The tokens vLLM serves for a version are what alignd's own engine would serve for it (float32, greedy)."""
    d = deployment
    path = d.settings.checkpoint(registry.get_version(d.r, 1)["path"])
    engine = Engine(Policy.load(1, path), max_batch_size=4, threads=1)
    engine.start()
    try:
        with d.client() as c:
            for prompt in PROMPTS:
                ours = engine.generate(
                    [{"role": "user", "content": prompt}], SamplingParams(temperature=0, max_tokens=8)
                )
                theirs = _chat(c, prompt).json()["choices"][0]["message"]["content"]
                assert theirs == ours[0], f"{prompt!r}: vLLM {theirs!r} vs alignd's engine {ours[0]!r}"
    finally:
        engine.stop()


def test_client_disconnect_aborts_the_request_in_vllm(deployment):
    d = deployment
    assert registry.current_version(d.r) == 1  # the untrained base (runs before the cycle's test publishes)
    before = _aborted_in_vllm(d)
    # greedy on the untrained base: no end-of-sequence, so each answer is still being generated when its client leaves
    body = {"messages": [{"role": "user", "content": "Say a word."}], "max_tokens": 240, "stream": True}
    body["temperature"] = 0
    # the tiny model decodes 200 tokens in a fraction of a second, so a hang-up can arrive after the last one: of
    # six answers at least one must be cut short in vLLM (an abort in vLLM's log comes from nothing else)
    for _ in range(6):
        with d.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as s:
            for line in s.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break  # the first token arrived: hang up mid-generation
    wait_for(lambda: _aborted_in_vllm(d) > before, 30, what="vLLM aborting the request of a client that left")


def test_cycle_publishes_a_lora_version_every_process_serves_then_rollback_and_arena(deployment):
    d = deployment
    with d.client() as c:
        for i in range(12):  # pairwise votes on real completions: the cycle's training data
            body = _chat(c, f"What is {i % 10} plus {i % 7}?", n=2, temperature=1.0, seed=i).json()
            vote = c.post("/v1/feedback", json={"completion_id": body["id"], "type": "pairwise", "winner": i % 2})
            assert vote.status_code in (200, 201)
    # no adapter setting: with ALIGND_ENGINE=vllm the cycle trains a LoRA version by itself
    config = json.dumps({**TINY_CYCLE, "update": {"algorithm": "dpo", "steps": 2, "seconds": 20}})
    cycle = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "train", "cycle", "--json", "--config", config],
        cwd=ROOT,
        env=d.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cycle.returncode == 0, cycle.stderr[-3000:]
    version = registry.current_version(d.r)
    assert version == 2, cycle.stdout[-2000:]
    path = d.settings.checkpoint(registry.get_version(d.r, 2)["path"])
    assert (path / "adapter_config.json").is_file(), "with ALIGND_ENGINE=vllm the cycle publishes an adapter"

    t0 = time.monotonic()
    wait_for(lambda: d.served_by_every_process(2), 60, interval=0.1, what="both API processes on v2")
    swap_s = time.monotonic() - t0
    with d.client() as c:
        served = _chat(c, "Say a word.")
        assert served.json()["system_fingerprint"] == "alignd-v2"
        models = {m["id"] for m in httpx.get(f"{d.vllm_url()}/v1/models", timeout=10).json()["data"]}
        assert "alignd-v2" in models, models

        # arena: n=2 gets one answer from the current version and one from its parent, in one vLLM engine
        pair = _chat(c, "Say a number.", n=2, temperature=1.0, seed=3).json()
        rec = get_completion(d.r, pair["id"])
        assert rec.arena and sorted(ch.version for ch in rec.choices) == [1, 2]

    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        assert admin.post("/admin/rollback", json={"version": 1}).json()["current"] == 1
    wait_for(lambda: d.served_by_every_process(1), 60, interval=0.1, what="both API processes back on v1")
    with d.client() as c:
        assert _chat(c, "Say a word.").json()["system_fingerprint"] == "alignd-v1"
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        assert admin.post("/admin/rollback", json={"version": 2}).json()["current"] == 2
    wait_for(lambda: d.served_by_every_process(2), 60, interval=0.1, what="both API processes on v2 again")
    assert swap_s < 30


def test_adapter_with_wrong_base_digest_is_refused_and_the_old_version_serves(deployment):
    d = deployment
    current = registry.current_version(d.r)
    base_path = d.settings.checkpoint(registry.get_version(d.r, 1)["path"])
    model = add_adapter(tiny_model("llama", seed=0), LoRAConfig(rank=8))
    tok = tiny_tokenizer()

    def save(dest):
        save_adapter(model, dest, base=d.settings.stored_path(base_path), base_digest="0" * 64)
        tok.save_pretrained(dest)

    bad = publish_version(d.r, d.settings, save, {"source": "dpo", "parent": current, "metrics": {}})

    def refused() -> dict | None:
        body = httpx.get(f"{d.url}/readyz", timeout=5).json()
        return body.get("refused_versions", {}).get(str(bad))

    reason = wait_for(refused, 60, what="the wrong-base adapter refused")
    assert "BaseMismatch" in reason
    with d.client() as c:
        assert _chat(c, "Say a word.").json()["system_fingerprint"] == f"alignd-v{current}"
    with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
        assert admin.post("/admin/rollback", json={"version": current}).json()["current"] == current


def test_vllm_killed_under_load_answers_503_then_recovers(deployment):
    d = deployment
    current = registry.current_version(d.r)
    statuses: list[tuple[int, str]] = []
    stop_load = threading.Event()

    def load() -> None:
        with d.client() as c:
            while not stop_load.is_set():
                try:
                    r = _chat(c, "Say a number.", max_tokens=4)
                except httpx.HTTPError as exc:
                    statuses.append((0, type(exc).__name__))
                    continue
                code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
                if r.status_code == 503:
                    code = f"{code}|{r.headers.get('retry-after')}"
                statuses.append((r.status_code, code))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        pids = _vllm_pids(d)
        assert pids, "no vLLM process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: any(s == 503 for s, _ in statuses), 30, what="a 503 while vLLM is down")
        # the supervisor restarts vLLM; alignd registers the adapter again and answers on its own
        wait_for(lambda: d.ready(), 240, interval=1, what="alignd ready again after vLLM's restart")
    finally:
        stop_load.set()
        for t in threads:
            t.join(timeout=130)
    assert all(s in (200, 503) for s, _ in statuses), {s for s in statuses if s[0] not in (200, 503)}
    assert all(code == "engine_unavailable|1" for s, code in statuses if s == 503), set(statuses)
    with d.client() as c:  # both API processes answer again, on the version they served before
        for _ in range(6):
            back = wait_for(lambda: (r := _chat(c, "Say a word.")).status_code == 200 and r, 60, what="a 200")
            assert back.json()["system_fingerprint"] == f"alignd-v{current}"
