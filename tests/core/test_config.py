"""The settings object: the serving device, dtype and quantization are validated, and each `auto` follows its rule."""

from __future__ import annotations

import os

import pytest
import torch
from pydantic import ValidationError

from core.config import BF16_MIN_PARAMETERS, ENGINE_ALL_CORES_MIN_PARAMETERS, Settings


@pytest.mark.parametrize(
    ("name", "value"),
    [("dtype", "fp8"), ("dtype", "half"), ("device", "gpu"), ("device", "cuda:x"), ("quantize", "int4")],
)
def test_bad_device_or_dtype_is_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(f"ALIGND_{name.upper()}", value)
    with pytest.raises(ValidationError, match=name):
        Settings()


def test_explicit_dtype_wins_and_auto_picks_by_device_and_size(monkeypatch):
    monkeypatch.setenv("ALIGND_DTYPE", "float16")
    assert Settings().serving_dtype(10) == torch.float16
    monkeypatch.setenv("ALIGND_DTYPE", "auto")
    monkeypatch.setenv("ALIGND_DEVICE", "cuda:1")
    assert Settings().device == "cuda:1"
    auto = Settings(device="cpu")
    assert auto.serving_dtype(BF16_MIN_PARAMETERS - 1) == torch.float32  # small models: float32 measures faster
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert auto.serving_dtype(BF16_MIN_PARAMETERS) == (torch.bfloat16 if native_bf16 else torch.float32)


def test_quantize_auto_is_int8_only_for_a_bf16_model_on_a_cpu(monkeypatch):
    auto, big = Settings(device="cpu"), BF16_MIN_PARAMETERS
    assert auto.quantize == "auto" and auto.serving_quantize(big, torch.bfloat16) == "int8"
    assert auto.serving_quantize(big, torch.float32) == "none"  # the kernel's fast path takes bf16 activations
    assert auto.serving_quantize(big - 1, torch.bfloat16) == "none"
    assert auto.serving_quantize(big, torch.bfloat16, "cuda:0") == "none"  # measured on CPU only
    monkeypatch.setenv("ALIGND_QUANTIZE", "none")
    assert Settings(device="cpu").serving_quantize(big, torch.bfloat16) == "none"
    assert Settings(device="cpu", quantize="int8").serving_quantize(10, torch.float32) == "int8"


def test_serving_pins_the_caller_to_one_thread_and_gives_the_engine_the_configured_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("ALIGND_TORCH_THREADS", "2")
    monkeypatch.setenv("ALIGND_DEVICE", "cpu")
    try:
        assert Settings().apply_torch_threads(serving=True) is None
        assert torch.get_num_threads() == 1  # main and loading threads: no second thread pool beside the engine's
        assert Settings().serving_threads(10) == 2 and Settings().serving_threads(10**9) == 2  # set: any size
        assert Settings().apply_torch_threads() == 2 and torch.get_num_threads() == 2  # training: every thread
        monkeypatch.delenv("ALIGND_TORCH_THREADS")
        monkeypatch.setenv("ALIGND_DEVICE", "cuda")
        assert Settings().apply_torch_threads(serving=True) is None  # on a GPU nothing is pinned
        assert Settings().serving_threads(10**9) is None
    finally:
        torch.set_num_threads(before)


def test_unset_serving_threads_leave_a_core_to_the_event_loop_only_for_small_models(monkeypatch):
    monkeypatch.delenv("ALIGND_TORCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    big, small = ENGINE_ALL_CORES_MIN_PARAMETERS, ENGINE_ALL_CORES_MIN_PARAMETERS - 1
    assert Settings(device="cpu").serving_threads(big) == 8
    assert Settings(device="cpu").serving_threads(small) == 7
    assert Settings(device="cpu", serve_workers=2).serving_threads(big) == 4  # the processes share the cores
    assert Settings(device="cpu", serve_workers=2).serving_threads(small) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert Settings(device="cpu", serve_workers=4).serving_threads(big) == 1  # never none


def test_a_shared_machine_gives_the_api_and_the_trainer_half_the_cores_each(monkeypatch):
    monkeypatch.delenv("ALIGND_TORCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert Settings(device="cpu").shared_machine_threads() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert Settings(device="cpu").shared_machine_threads() == 1
    assert Settings(device="cpu", torch_threads=3).shared_machine_threads() is None  # the operator's count stands
    assert Settings(device="cuda").shared_machine_threads() is None


def test_training_follows_the_load_on_a_shared_cpu_unless_the_count_is_fixed(monkeypatch):
    monkeypatch.delenv("ALIGND_TORCH_THREADS", raising=False)
    monkeypatch.delenv("ALIGND_SHARE_CORES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert Settings(device="cpu").training_threads_follow() == (8, 4)  # every core idle, the split while serving
    assert Settings(device="cpu", share_cores="split").training_threads_follow() is None
    assert Settings(device="cpu", torch_threads=3).training_threads_follow() is None  # the operator's count stands
    assert Settings(device="cuda").training_threads_follow() is None


def test_engine_auto_needs_a_configured_vllm_and_a_gpu_or_a_large_model():
    from core.config import VLLM_MIN_PARAMETERS

    big, small = VLLM_MIN_PARAMETERS, VLLM_MIN_PARAMETERS - 1
    assert Settings(device="cpu").serving_engine(big) == "builtin"  # nothing configured: the embedded default
    cpu = Settings(device="cpu", vllm_python="/opt/vllm/bin/python")
    assert [cpu.serving_engine(small), cpu.serving_engine(big), cpu.serving_engine()] == ["builtin", "vllm", "builtin"]
    assert cpu.bootstrap_arch() == "gpt2"  # the built-in assistant is small: alignd's engine serves it
    gpu = Settings(device="cuda", vllm_url="http://vllm:8000")
    assert gpu.serving_engine(small) == "vllm" and gpu.serving_engine() == "vllm"
    forced = Settings(device="cpu", engine="vllm", vllm_python="/opt/vllm/bin/python")
    assert forced.serving_engine(small) == "vllm" and forced.bootstrap_arch() == "llama"
    assert Settings(device="cpu", engine="builtin", vllm_url="http://vllm:8000").serving_engine(big) == "builtin"
