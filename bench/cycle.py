"""Cycle benchmark at a real model size: one training cycle on SmolLM2-135M's shape (bench/shapes.py) with full
fine-tuning and with LoRA — seconds per stage, peak RSS, bytes of the published version, publish → served. JSON out.

Per mode, from nothing: an embedded Redis and a fresh ALIGND_HOME; `alignd bootstrap --base <shape folder>` as v1;
simulated pairwise feedback on world prompts (reference vs wrong answers, judged by a training/annotators.py
annotator, written through the store's own submit path); one `alignd serve` process on the deployment; then
`workers.cycle.run_cycle` in a fresh child process (so its peak RSS, `ru_maxrss`, is that mode's alone). The budgets
are small (the point is mechanics and resources, not quality) and the gate is open so the candidate publishes.
Publish → served: from the registry switch (the "published" event's timestamp, written by the same script that
switches) to the first /readyz and the first chat answer carrying the new version (X-Policy-Version).

Targets: LoRA peak RSS <= 50 % of full's and <= 8 GB; adapter checkpoint <= 5 % of the full checkpoint's
bytes; publish → serving <= 1 s.

    python bench/cycle.py                           # builds the shape first; ~10-15 min on 2 shared cores
    python bench/cycle.py --base /tmp/smollm2-135m --modes lora
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import wait_ready  # noqa: E402
from workers.cycle_config import OPEN_GATE  # noqa: E402

ADMIN = "sk-bench-admin"
USER = "sk-bench-user"
USERS = f"{USER}:bench"


def cycle_overrides(mode: str, steps: int) -> dict:
    """Small budgets for a 135 M model on 2 cores; the gate open (every threshold at its loosest)."""
    return {
        "lock_ttl_s": 600.0,
        "reward": {"max_seconds": 20.0, "batch_size": 4, "epochs": 1, "max_length": 96},
        "update": {"adapter": mode, "steps": steps, "seconds": 1200.0},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "samples_per_prompt": 4, "max_new_tokens": 16, "ppo_epochs": 1},
        "eval": {"n_per_family": 1, "max_new_tokens": 8},
        "gate": {**OPEN_GATE, "fallback": False, "reward_tolerance": 1.0},
    }


def env_for(home: Path, url: str, device: str = "cpu") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        {
            "ALIGND_HOME": str(home),
            "ALIGND_REDIS_URL": url,
            "ALIGND_API_KEYS": USERS,
            "ALIGND_ADMIN_KEY": ADMIN,
            "ALIGND_DEVICE": device,
            "ALIGND_POLL_SECONDS": "1.0",
            "ALIGND_CHAT_RATE_PER_MINUTE": "1000000",
            "ALIGND_SMOKE_TEST_TIMEOUT_S": "120",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def seed_feedback(r, n: int, seed: int = 0) -> int:
    """`n` pairwise votes on world prompts (reference answer vs a wrong one, order shuffled), judged by a noisy
    balanced annotator, saved and submitted as the API would."""
    import uuid

    from pydantic import TypeAdapter

    from store import feedback as fb
    from store.completions import ChoiceRecord, CompletionRecord, save_completion
    from training import world
    from training.annotators import Annotator

    rng = random.Random(seed)
    judge = Annotator("bench", "balanced", noise=0.25)
    body_type, limits = TypeAdapter(fb.FeedbackIn), fb.FeedbackLimits(10**6, 10**7, 100)
    for _ in range(n):
        task = world.sample_task(rng, rng.choice(["arithmetic", "reverse", "uppercase", "sort", "maximum"]))
        texts = [task.answer, world.wrong_answer(task, rng)]
        rng.shuffle(texts)
        label = judge.compare(task, texts[0], texts[1], rng)
        winner = label if label in (0, 1) else int(world.check(task, texts[1]) > world.check(task, texts[0]))
        rec = CompletionRecord(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            user="bench",
            messages=[{"role": "user", "content": task.prompt}],
            choices=[ChoiceRecord(index=i, text=t, finish_reason="stop", version=1) for i, t in enumerate(texts)],
            version=1,
        )
        save_completion(r, rec)
        body = body_type.validate_python({"completion_id": rec.id, "type": "pairwise", "winner": winner})
        fb.submit_feedback(r, body, user="bench", limits=limits)
    return n


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def child(args: argparse.Namespace) -> None:
    """One cycle in this process; prints {stages, peak_rss, report} as the last line."""
    from core.config import Settings
    from store.client import connect
    from workers.cycle import report_json, run_cycle
    from workers.cycle_config import CycleConfig

    settings = Settings(home=args.home, redis_url=args.redis_url, api_keys=USERS, admin_key=ADMIN, device=args.device)
    settings.apply_torch_threads()
    r = connect(args.redis_url)
    marks: list[tuple[str, float, float]] = []  # (stage, wall time, monotonic)
    hwm: dict[str, int] = {}  # the process's peak RSS as each stage ends: which stage set the peak
    start = time.monotonic()

    def progress(stage: str, info: dict) -> None:
        marks.append((stage, time.time(), time.monotonic()))
        hwm[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    report = run_cycle(r, settings, CycleConfig.from_dict(cycle_overrides(args.mode, args.steps)), progress=progress)
    # seconds per stage: from the previous stage's event (the cycle's start for the first) to this one's
    stages: dict[str, float] = {}
    prev = start
    for stage, _, mono in marks:
        stages[stage] = round(stages.get(stage, 0.0) + mono - prev, 2)
        prev = mono
    stages["after_published"] = round(time.monotonic() - prev, 2)  # PPO state save, settle
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "stages_s": stages,
                "total_s": round(time.monotonic() - start, 2),
                "peak_rss_bytes": peak_kb * 1024,
                "peak_rss_bytes_by_stage_end": hwm,
                "report": json.loads(report_json(report)),
            }
        )
    )


def watch_served(r, api: str, start_version: int, stop: threading.Event, out: dict) -> None:
    """After the registry's current version moves, poll the API until /readyz and a chat answer show it."""
    from store import registry

    while not stop.is_set() and (registry.current_version(r) or start_version) == start_version:
        time.sleep(0.05)
    if stop.is_set():
        return
    new = registry.current_version(r)
    at = next((e["at"] for e in registry.find_events(r, event="published", version=new)), None)
    out.update(version=new, switched_at=at)
    body = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 1, "temperature": 0}
    with httpx.Client(base_url=api, timeout=120, headers={"Authorization": f"Bearer {USER}"}) as c:
        while not stop.is_set() and "readyz_s" not in out:
            if c.get("/readyz").json().get("policy_version") == new:
                out["readyz_s"] = round(time.time() - at, 3)
            time.sleep(0.01)
        while not stop.is_set() and "chat_s" not in out:
            t_sent = time.time()
            resp = c.post("/v1/chat/completions", json=body)
            if int(resp.headers.get("X-Policy-Version", 0)) == new:
                out["chat_s"] = round(t_sent - at, 3)  # the request was sent after the API served the version
                out["chat_answer_s"] = round(time.time() - at, 3)


def load_breakdown(settings, folder: Path, base_folder: Path) -> dict:
    """What an API process does between the switch and serving, step by step, here in the parent (the cycle is over,
    the API idle), as service/loader.py does it: sha256 check of the version's files, load (an adapter: merged into
    the base the API was serving, kept in a BaseCache with its spare memory ready), smoke test."""
    import torch

    from service.engine import Policy
    from service.loader import ADAPTER_SMOKE_PROMPT_TOKENS, smoke_test
    from training.checkpoint import verify_checkpoint
    from training.lora import BaseCache, adapter_base

    torch.set_num_threads(1)  # as the API process runs (ALIGND_TORCH_THREADS=1)
    adapter = adapter_base(folder) is not None
    cache = BaseCache()
    if adapter:  # the API served the base (v1) before: it is in its cache, spare memory prepared in the background
        base = Policy.load(1, base_folder, settings.torch_device())
        cache.offer(base_folder, base.model, base.tokenizer, settings.torch_device())
        deadline = time.monotonic() + 60
        while not cache.spare_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
    t0 = time.perf_counter()
    verify_checkpoint(folder)
    t1 = time.perf_counter()
    policy = Policy.load(2, folder, settings.torch_device(), resolve_base=settings.checkpoint, base_cache=cache)
    t2 = time.perf_counter()
    smoke_test(policy, 120, ADAPTER_SMOKE_PROMPT_TOKENS if adapter else None)
    t3 = time.perf_counter()
    return {"verify_sha256": round(t1 - t0, 3), "load": round(t2 - t1, 3), "smoke_test": round(t3 - t2, 3)}


def run_mode(mode: str, base: Path, args: argparse.Namespace) -> dict:
    from core.config import Settings
    from core.redis_server import EmbeddedRedis, free_port
    from store import registry
    from store.client import connect

    tmp = Path(tempfile.mkdtemp(prefix=f"alignd-bench-cycle-{mode}-"))
    home = tmp / "home"
    server = EmbeddedRedis(tmp / "redis")
    url = server.start()
    env = env_for(home, url, args.device)
    api_proc = None
    try:
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "alignd.cli", "bootstrap", "--base", str(base), "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        bootstrap_s = time.monotonic() - t0
        r = connect(url)
        seed_feedback(r, args.feedback, seed=args.seed)
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        api_env = {**env, "ALIGND_TORCH_THREADS": "1"}
        api_proc = subprocess.Popen(
            [sys.executable, "-m", "alignd.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=api_env,
            stdout=open(tmp / "api.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_ready(api, api_proc, timeout_s=300)
        served: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=watch_served, args=(r, api, 1, stop, served), daemon=True)
        watcher.start()
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                "--mode",
                mode,
                "--home",
                str(home),
                "--redis-url",
                url,
                "--steps",
                str(args.steps),
                "--device",
                args.device,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} cycle failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        watcher.join(timeout=180)
        stop.set()
        version = result["report"].get("version")
        meta = registry.get_version(r, version) if version else None
        settings = Settings(home=home, redis_url=url, api_keys=USERS, admin_key=ADMIN, device=args.device)
        folder = settings.checkpoint(meta["path"]) if meta else None
        base_folder = settings.checkpoint(registry.get_version(r, 1)["path"])
        rm_meta = registry.get_reward_version(r, registry.current_reward_version(r))
        report = result["report"]
        return {
            "mode": mode,
            "status": report.get("status"),
            "version": version,
            "bootstrap_s": round(bootstrap_s, 1),
            "stages_s": result["stages_s"],
            "cycle_s": result["total_s"],
            "peak_rss_bytes": result["peak_rss_bytes"],
            "peak_rss_bytes_by_stage_end": result["peak_rss_bytes_by_stage_end"],
            "api_load_breakdown_s": load_breakdown(settings, folder, base_folder) if folder else None,
            "checkpoint_bytes": folder_bytes(folder) if folder else None,
            "checkpoint_files": sorted(f.name for f in folder.iterdir()) if folder else None,
            "base_checkpoint_bytes": folder_bytes(base_folder),
            "reward_checkpoint_bytes": folder_bytes(settings.checkpoint(rm_meta["path"])) if rm_meta else None,
            "adapter": (meta or {}).get("adapter"),
            "publish_to_served": served,
            "update": {k: report.get("update", {}).get(k) for k in ("algorithm", "steps", "resumed", "seconds")},
        }
    finally:
        if api_proc is not None:
            try:
                os.killpg(api_proc.pid, signal.SIGTERM)
                api_proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(api_proc.pid, signal.SIGKILL)
        server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="shape folder from bench/shapes.py (default: build one now)")
    ap.add_argument("--modes", default="full,lora", help="comma-separated update.adapter values, one cycle each")
    ap.add_argument("--feedback", type=int, default=24, help="pairwise votes seeded before the cycle")
    ap.add_argument("--steps", type=int, default=1, help="update.steps (PPO steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="ALIGND_DEVICE of the cycle and the API: cpu, cuda, auto")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    base = args.base
    built = None
    if base is None:
        built = Path(tempfile.mkdtemp(prefix="alignd-bench-shape-")) / "smollm2-135m"
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "shapes.py"), "--out", str(built), "--json"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        base = built
    from training.lora import parameter_count

    out = {
        "bench": "cycle",
        "shape": "smollm2-135m",
        "parameters": parameter_count(base),
        "feedback": args.feedback,
        "device": args.device,
        "overrides": cycle_overrides("<mode>", args.steps),
        "modes": {},
    }
    try:
        for mode in args.modes.split(","):
            out["modes"][mode] = run_mode(mode, base, args)
    finally:
        if built is not None:
            shutil.rmtree(built.parent, ignore_errors=True)
    full, lora = out["modes"].get("full"), out["modes"].get("lora")
    if full and lora:
        rss = lora["peak_rss_bytes"] / full["peak_rss_bytes"]
        size = lora["checkpoint_bytes"] / full["checkpoint_bytes"]
        out["lora_vs_full"] = {"peak_rss_ratio": round(rss, 3), "checkpoint_bytes_ratio": round(size, 4)}
        out["targets"] = {
            "lora_rss_le_50pct_of_full": rss <= 0.5,
            "lora_rss_le_8GB": lora["peak_rss_bytes"] <= 8e9,
            "adapter_le_5pct_of_full": size <= 0.05,
        }
    served = [m["publish_to_served"].get("readyz_s") for m in out["modes"].values()]
    out.setdefault("targets", {})["publish_to_serving_le_1s"] = {
        mode: (s is not None and s <= 1.0) for mode, s in zip(out["modes"], served)
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
