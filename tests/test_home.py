"""A deployment's home as a user handles it: moved to another path, backed up and restored with the procedure in
deploy/README.md (its shell blocks are run as written), and a checkpoint carried from one deployment to another. Every
test runs the real CLI (`alignd bootstrap`, `alignd serve`) as subprocesses with the embedded Redis under the home."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from core.config import Settings
from core.redis_server import EmbeddedRedis, ensure_redis, free_port, redis_server_binary
from service.loader import load_version
from store import registry
from store.client import connect
from store.stats import feedback_stats
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from tests.workers.helpers import (
    ADMIN_KEY,
    ROOT,
    USER_KEYS,
    chat,
    publish_tiny,
    seed_feedback,
    stop,
    wait_for,
    wait_http,
)
from training.checkpoint import read_manifest, write_checkpoint

# the tests marked slow start the CLI and an API process: 20-100 s each on a shared 2-core CPU


def _env(home: Path) -> dict[str, str]:
    """The environment of a user running alignd on one machine: a home, no ALIGND_REDIS_URL (embedded Redis)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env.update(
        {
            "ALIGND_HOME": str(home),
            "ALIGND_API_KEYS": USER_KEYS,
            "ALIGND_ADMIN_KEY": ADMIN_KEY,
            "ALIGND_POLL_SECONDS": "0.2",
            "ALIGND_DEVICE": "cpu",
            "ALIGND_TORCH_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def _alignd(home: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "alignd.cli", *args, "--json"],
        cwd=ROOT,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tiny_folder(path: Path) -> Path:
    """A local HF causal-LM folder, what `alignd bootstrap --base` registers."""
    tiny_sft_model("gpt2", seed=0, steps=30).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


class _Serving:
    """`alignd serve` on a free port for `home`, stopped (with its embedded Redis) on exit."""

    def __init__(self, home: Path, log: Path):
        self.home, self.log, self.port = home, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Serving:
        cmd = [sys.executable, "-m", "alignd.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(self.home),
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(self.url, timeout=120)
        except TimeoutError:
            stop(self.proc)
            raise AssertionError(f"alignd serve did not become ready:\n{self.log.read_text()[-3000:]}") from None
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)
        _shutdown_embedded(self.home)

    def client(self, key: str = "sk-test-alice") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _shutdown_embedded(home: Path) -> None:
    """Stop a home's embedded Redis if a process left it running (it runs in its own session)."""
    server = EmbeddedRedis(home / "redis")
    url = server.running_url()
    if url:
        try:
            connect(url).shutdown(nosave=False)
        except Exception:  # it went down while we shut it down: what we wanted
            pass


def _served_version(server: _Serving) -> int:
    with server.client() as c:
        resp = chat(c)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    return int(resp.headers["X-Policy-Version"])


def _readme_block(name: str) -> str:
    text = (ROOT / "deploy" / "README.md").read_text()
    found = re.search(rf"<!-- tests/test_home.py runs this block: {name} -->\n```bash\n(.*?)```", text, re.S)
    assert found, f"deploy/README.md has no block marked {name}"
    return found.group(1)


@pytest.mark.slow
def test_a_moved_home_serves_its_versions_relative_and_absolute(tmp_path):
    """Bootstrap v1 (registry path relative), add v2 as a registry written before relative paths would (absolute),
    stop, `mv` the home, serve from the new path: v2 serves, and after a rollback v1 does."""
    old, new = tmp_path / "old-home", tmp_path / "moved" / "home"
    assert _alignd(old, "bootstrap", "--base", str(_tiny_folder(tmp_path / "base")))["version"] == 1
    embedded = EmbeddedRedis(old / "redis")
    r = connect(embedded.start())
    try:
        settings = Settings(home=old)
        assert not Path(registry.get_version(r, 1)["path"]).is_absolute()
        model, tok = tiny_sft_model("gpt2", seed=1, steps=30), tiny_tokenizer()
        path = write_checkpoint(
            lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
            settings.checkpoints_dir / "v2",
            {"version": 2, "source": "ppo", "parent": 1},
        )
        assert registry.allocate_version(r) == 2
        registry.add_version(r, 2, {"path": str(path), "parent": 1, "source": "ppo"})
        registry.set_current(r, 2, expected=1)
    finally:
        r.close()
        embedded.stop()
    new.parent.mkdir()
    shutil.move(old, new)
    assert not old.exists()
    with _Serving(new, tmp_path / "serve.log") as server:
        assert _served_version(server) == 2
        with server.client(ADMIN_KEY) as admin:
            assert admin.post("/admin/rollback", json={"version": 1}).status_code == 200
        wait_for(lambda: _served_version(server) == 1, 60, what="v1 served after the rollback")
        with server.client(ADMIN_KEY) as admin:
            listing = admin.get("/admin/versions").json()
        assert listing["serving"]["refused"] == {} and not any(m.get("refused") for m in listing["data"])


@pytest.mark.slow
def test_a_checkpoint_carried_from_another_deployment_serves(tmp_path):
    """Deployment A bootstraps; its checkpoints/v1 is copied; deployment B (its own home and Redis) bootstraps from
    the copy and serves it."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    _alignd(home_a, "bootstrap", "--base", str(_tiny_folder(tmp_path / "base")))
    carried = tmp_path / "from-a-v1"
    shutil.copytree(home_a / "checkpoints" / "v1", carried)
    assert (carried / "manifest.json").is_file()
    assert _alignd(home_b, "bootstrap", "--base", str(carried))["version"] == 1
    manifest = read_manifest(home_b / "checkpoints" / "v1")
    assert manifest["carried_from"]["version"] == 1 and manifest["carried_from"]["source"] == "base"
    assert "manifest.json" not in manifest["files"]
    with _Serving(home_b, tmp_path / "serve.log") as server:
        assert _served_version(server) == 1
        with server.client(ADMIN_KEY) as admin:
            listed = admin.get("/admin/versions").json()["data"]
        assert [m["carried_from"]["version"] for m in listed] == [1] and listed[0]["source"] == "base"


def _bash(script: str, **env: Path | str | int) -> None:
    done = subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
def test_the_documented_backup_of_a_running_home_restores_elsewhere(tmp_path):
    """A running home with 2 versions and feedback, backed up by deploy/README.md's block, restored into a new path
    (while the original keeps running and takes more feedback), serves the same version and the same feedback."""
    home, backup, restored = tmp_path / "home", tmp_path / "backup", tmp_path / "elsewhere" / "home"
    _alignd(home, "bootstrap", "--base", str(_tiny_folder(tmp_path / "base")))
    embedded = EmbeddedRedis(home / "redis")  # the running deployment's Redis
    r = connect(embedded.start())
    try:
        settings = Settings(home=home)
        publish_tiny(r, settings, seed=1, source="ppo", parent=1, expected=1)
        seed_feedback(r, 6)
        with r.pipeline() as pipe:  # the counters the API reports, and the log itself
            before = pipe.hgetall("alignd:stats:feedback:events").xlen("alignd:feedback:log").execute()
        _bash(_readme_block("backup-embedded"), ALIGND_HOME=home, BACKUP=backup)
        seed_feedback(r, 2, seed=1)  # after the backup: must not appear in the restored copy
        _bash(_readme_block("restore-embedded"), BACKUP=backup, NEW=restored)
        with _Serving(restored, tmp_path / "serve.log") as server:
            assert _served_version(server) == 2
            with server.client(ADMIN_KEY) as admin:
                stats = admin.get("/admin/stats").json()
            assert stats["events"]["total"] == int(before[0]["total"]) == 6
            ours = connect(EmbeddedRedis(restored / "redis").running_url())
            assert Path(ours.config_get("dir")["dir"]).resolve() == (restored / "redis").resolve()
            assert ours.xlen("alignd:feedback:log") == before[1] == 6
        assert r.xlen("alignd:feedback:log") == 8  # the original kept its own Redis and its later feedback
    finally:
        r.close()
        embedded.stop()


def test_a_copied_home_never_attaches_to_the_original_redis(tmp_path):
    """A home copied whole while its embedded Redis runs carries that server's url file: the copy must start its own
    server on its own files, not write into the original's."""
    original = EmbeddedRedis(tmp_path / "a" / "redis")
    r = connect(original.start())
    try:
        r.set("alignd:marker", "original")
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        assert (tmp_path / "b" / "redis" / "url").read_text() == original.url
        assert EmbeddedRedis(tmp_path / "b" / "redis").running_url() is None
        url, started = ensure_redis(None, tmp_path / "b")
        try:
            assert started is not None and url != original.url
            copy = connect(url)
            copy.set("alignd:marker", "copy")
            assert r.get("alignd:marker") == "original"
        finally:
            started.stop()
        assert EmbeddedRedis(tmp_path / "a" / "redis").running_url() == original.url  # the original is still found
    finally:
        r.close()
        original.stop()


@pytest.mark.slow
def test_the_documented_backup_with_an_external_redis_restores_into_a_new_redis(tmp_path):
    """deploy/README.md's external-Redis blocks: an RDB snapshot over the network plus the home, restored into a new
    redis-server (AOF written from the snapshot) and a new home path; the restored deployment loads its current
    version and has the feedback of the snapshot, not what came after."""
    external = EmbeddedRedis(tmp_path / "external-redis")  # stands in for the deployment's Redis service
    url = external.start()
    r = connect(url)
    new_dir, new_port = tmp_path / "new-redis", free_port()
    restored = None
    try:
        settings = Settings(home=tmp_path / "home", redis_url=url)
        publish_tiny(r, settings)
        publish_tiny(r, settings, seed=1, source="ppo", parent=1, expected=1)
        seed_feedback(r, 5)
        before = feedback_stats(r)
        _bash(_readme_block("backup-external"), ALIGND_REDIS_URL=url, ALIGND_HOME=settings.home, BACKUP=tmp_path / "b")
        seed_feedback(r, 2, seed=1)
        path = f"{Path(redis_server_binary()).parent}:{os.environ['PATH']}"  # redis-server, redis-cli
        _bash(
            _readme_block("restore-external"),
            BACKUP=tmp_path / "b",
            REDIS_DIR=new_dir,
            REDIS_PORT=new_port,
            NEW_HOME=tmp_path / "elsewhere" / "home",
            PATH=path,
        )
        restored = EmbeddedRedis(new_dir, new_port)  # started as usual: appendonly yes, on the restored AOF
        r2 = connect(restored.start())
        assert feedback_stats(r2) == before and feedback_stats(r)["events"]["total"] == 7
        new_settings = Settings(home=tmp_path / "elsewhere" / "home", redis_url=restored.url, device="cpu")
        assert registry.current_version(r2) == 2
        assert load_version(r2, new_settings, 2).version == 2  # sha256 manifest, load and smoke test
        assert r2.config_get("appendonly")["appendonly"] == "yes"
    finally:
        r.close()
        external.stop()
        if restored is not None:
            restored.stop()
