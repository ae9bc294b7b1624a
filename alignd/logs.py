"""Quiet logs: library output that tells an operator nothing, switched off for every alignd process, with the reason.

`alignd` sets these as defaults of its own environment before any library is imported, and every process it starts
(API, Celery workers, beat, Flower, bootstrap) inherits them; a value already set wins, so
`TRANSFORMERS_VERBOSITY=warning alignd up` brings transformers' warnings back. Progress bars follow the terminal:
training/sft.py reports every step to a terminal and every `SFTConfig.progress_seconds` to a log file.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

QUIET_ENV = {
    # transformers warns on every cycle about things alignd does on purpose: a reward model built on a causal LM gets a
    # fresh score head ("… LOAD REPORT … score.weight MISSING"), and generation checks of attention masks and pad
    # tokens. Errors still show.
    "TRANSFORMERS_VERBOSITY": "error",
    # transformers' tqdm bars for each model folder it reads or writes ("Loading weights", "Writing model shards"):
    # alignd's folders are local and load in milliseconds, and each bar is lines in a log file.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet_libraries(env: MutableMapping[str, str] = os.environ) -> None:
    """Set QUIET_ENV's variables in `env` where they are not set already."""
    for key, value in QUIET_ENV.items():
        env.setdefault(key, value)
