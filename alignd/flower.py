"""Flower as `alignd flower` runs it: Celery's own `celery flower` command, less two things an operator's log does not
need.

- At start Flower asks the workers for their stats, configuration and queues ("inspect"). Workers started beside it
  (`alignd up`) are still importing torch, none answers, and Flower logs one "Inspect method … failed" warning per
  question. It asks each worker again when that worker comes online, so those warnings are dropped for the first
  `STARTUP_QUIET_S` seconds; later ones (a worker that stops answering) are kept.
- Ctrl-C reaches Flower twice — from the terminal, which signals the whole process group, and forwarded by
  `alignd flower` — and the second interrupt lands in Flower's own shutdown ("Aborted!", exit code 1, or a traceback).
  Here SIGINT stops Flower as its SIGTERM does, once; signals after the first are ignored. They are ignored by a
  Python handler that returns, not by SIG_IGN: a second SIGINT already pending when SIG_IGN is set makes CPython print
  "Signal 2 ignored due to race condition" with a traceback.

    python -m alignd.flower --port=5555 --address=127.0.0.1    # what `alignd flower` runs
"""

from __future__ import annotations

import logging
import signal
import sys
import time

STARTUP_QUIET_S = 60.0  # workers beside Flower come online within this (torch import, embedded Redis) on 2 cores


class StartupInspectFilter(logging.Filter):
    """Drops Flower's "Inspect method … failed" records until `until` (time.monotonic())."""

    def __init__(self, until: float) -> None:
        super().__init__()
        self.until = until

    def filter(self, record: logging.LogRecord) -> bool:
        return not (time.monotonic() < self.until and record.getMessage().startswith("Inspect method"))


_stopping = False


def _stop_once(signum, _frame) -> None:
    global _stopping
    if _stopping:
        return
    _stopping = True
    signal.signal(signal.SIGTERM, _stop_once)  # replaces Flower's own SIGTERM handler, which would stop it again
    sys.exit(0)  # Flower's command catches SystemExit and stops its app (atexit)


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("flower.inspector").addFilter(StartupInspectFilter(time.monotonic() + STARTUP_QUIET_S))
    signal.signal(signal.SIGINT, _stop_once)
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", "-A", "workers.celery_app", "flower", *(sys.argv[1:] if argv is None else argv)]
    celery_main()


if __name__ == "__main__":
    main()
