"""The settings object: the serving device and dtype are validated, and `dtype=auto` follows its rule."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from core.config import BF16_MIN_PARAMETERS, Settings


@pytest.mark.parametrize(
    ("name", "value"), [("dtype", "fp8"), ("dtype", "half"), ("device", "gpu"), ("device", "cuda:x")]
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
