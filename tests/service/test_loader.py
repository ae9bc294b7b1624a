"""Loading a registered version for serving (service/loader.py): the serving dtype setting is applied."""

from __future__ import annotations

import torch

from service.loader import load_version
from tests.workers.helpers import make_settings, publish_tiny


def test_the_dtype_setting_decides_the_served_weights_and_auto_keeps_a_tiny_model_in_float32(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    assert load_version(r, settings, 1).dtype == torch.float32  # auto: far below BF16_MIN_PARAMETERS
    bf16 = load_version(r, make_settings(tmp_path / "home", redis_url, dtype="bfloat16"), 1)  # smoke-tested too
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
