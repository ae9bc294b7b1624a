"""deploy/: the compose layout's vLLM profiles and the override that puts alignd's services on them agree with each
other and with alignd's settings (docker itself is not needed: the files are read as compose reads them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_vllm_services_are_behind_profiles_and_see_the_data_volume_where_alignd_does():
    base = load("docker-compose.yml")["services"]
    assert {"vllm", "vllm-cpu"} <= set(base)
    assert base["vllm"]["profiles"] == ["vllm"] and base["vllm-cpu"]["profiles"] == ["vllm-cpu"]
    assert all("profiles" not in s for name, s in base.items() if not name.startswith("vllm"))  # default: unchanged
    alignd_mount = next(v for v in base["api-1"]["volumes"] if v.startswith("alignd-data:"))
    for name in ("vllm", "vllm-cpu"):
        svc = base[name]
        # the same volume at the same path, read-only: adapter paths alignd registers resolve there unchanged
        assert svc["volumes"] == [f"{alignd_mount}:ro"]
        assert svc["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert "--enable-lora" in svc["command"] and "--max-lora-rank 16" in svc["command"]
        assert svc["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert base["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert base["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert base["vllm-cpu"]["build"]["dockerfile"] == "Dockerfile.vllm-cpu"
    assert (DEPLOY / "Dockerfile.vllm-cpu").is_file()
    assert "vllm" in base["vllm-cpu"]["networks"]["default"]["aliases"]  # reached by the same name as the GPU one
    assert not base["vllm-cpu"]["deploy"]  # no GPU reservation inherited from the GPU service


def test_the_override_switches_every_alignd_service_to_vllm_and_names_only_existing_services():
    base = load("docker-compose.yml")["services"]
    override = load("docker-compose.vllm.yml")["services"]
    assert set(override) <= set(base)
    for name in ("api-1", "api-2", "worker-train", "worker", "beat"):
        env = override[name]["environment"]
        settings = Settings(engine=env["ALIGND_ENGINE"], vllm_url=env["ALIGND_VLLM_URL"])  # valid alignd settings
        assert settings.serving_engine() == "vllm" and settings.vllm_url == "http://vllm:8000"
    for api in ("api-1", "api-2"):
        after = override[api]["depends_on"]
        assert after["vllm"] == {"condition": "service_healthy", "required": False}
        assert after["vllm-cpu"] == {"condition": "service_healthy", "required": False}
        assert set(base[api]["depends_on"]) <= set(after)  # what the base asked for still holds
    # vLLM cannot put adapters on the built-in GPT-2: the vLLM layout registers a model of the user's as its base
    assert override["bootstrap"]["command"][:3] == ["alignd", "bootstrap", "--base"]
    assert "/data/checkpoints/v1" in base["vllm"]["command"]
