"""The `alignd` command line (typer): one tree, its commands in `alignd/commands/` by concern. Every command takes
its configuration from `ALIGND_*` variables (core/config.py).

    alignd up                     # everything: embedded Redis, bootstrap on first start, API, worker, beat, Flower
    alignd bootstrap --json       # train the built-in assistant (SFT) and register it as policy version 1
    alignd serve --port 8000      # the API alone
    alignd --help                 # the rest
"""

from __future__ import annotations

from alignd.commands import config, graders, ops, run, train  # noqa: F401  (each adds its commands to `app`)
from alignd.commands.common import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
