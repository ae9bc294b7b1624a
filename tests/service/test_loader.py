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


def test_a_registry_path_rewritten_to_a_valid_checkpoint_outside_the_root_is_refused(r, redis_url, tmp_path):
    """A local user who can write the registry points version 1 at a folder of their own: a complete, well-formed
    checkpoint (so only the confinement can stop it), then at /etc."""
    import json
    import shutil

    import pytest

    from store import keys, registry

    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    planted = tmp_path / "planted"
    shutil.copytree(registry.version_path(settings, r, 1), planted)
    meta = registry.get_version(r, 1)
    for path in (str(planted), "/etc"):
        r.hset(keys.registry_versions(), "1", json.dumps({**meta, "path": path}))
        with pytest.raises(ValueError, match="leaves the checkpoint root"):
            load_version(r, settings, 1)
        with pytest.raises(ValueError, match="leaves the checkpoint root"):
            registry.version_path(settings, r, 1)  # what the workers open
    r.hset(keys.registry_versions(), "1", json.dumps({**meta, "path": str(settings.checkpoints_dir / meta["path"])}))
    assert load_version(r, settings, 1).version == 1  # an absolute path inside the root still loads
