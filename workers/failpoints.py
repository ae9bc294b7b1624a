"""Failpoints: named places in the training cycle where a test or an incident drill injects a fault.

Like the failpoints of TiKV (fail-rs) and FoundationDB's BUGGIFY, they let a test stop the cycle at an exact moment
(after the reward stage, between publish and acknowledge …) with a real fault, instead of hoping a timer lands there:

    ALIGND_FAILPOINTS="after_publish=kill,in_publish=sleep:5,in_checkpoint=raise:ENOSPC"

Actions: `kill` (SIGKILL this process: no finally, no atexit — a power cut as far as this process can tell),
`raise` (FailpointError), `raise:ENOSPC` (OSError with that errno, as a full disk gives), `sleep:S` (seconds; a
Celery soft time limit or an outside kill -9 then lands there). Unset — the default and the production setting —
`hit` is one lookup in an empty dict: no fault, no cost. A misspelt point or action is a ValueError when the cycle
starts, before it takes any feedback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import time

log = logging.getLogger("alignd.failpoints")

POINTS = {
    "after_feedback": "the cycle's events are read and recorded in flight",
    "after_reward": "the reward stage is done (a new reward version may be current)",
    "after_ppo": "the PPO increment is done, nothing gated",
    "after_gate": "the gate's verdict is known, nothing published or recorded",
    "in_publish": "inside the checkpoint write of the new version (files partly written)",
    "in_checkpoint": "the checkpoint writer, before the model files (the place a full disk fails)",
    "after_publish": "the new version is current, its events not yet acknowledged",
    "after_gate_failed": "the gate failure is recorded, its events not yet acknowledged",
}
ACTIONS = ("kill", "raise", "sleep")


class FailpointError(RuntimeError):
    """The `raise` action of a failpoint."""


@functools.cache
def parse(spec: str) -> dict[str, tuple[str, str]]:
    """'point=action[:arg],…' → {point: (action, arg)}; ValueError naming what is wrong."""
    out: dict[str, tuple[str, str]] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        point, sep, action = item.partition("=")
        kind, _, arg = action.partition(":")
        if not sep or point not in POINTS:
            raise ValueError(
                f"failpoint {item!r}: unknown point {point!r}; known: {sorted(POINTS)} "
                f"(ALIGND_FAILPOINTS='point=action,…')"
            )
        if kind not in ACTIONS:
            raise ValueError(f"failpoint {item!r}: unknown action {kind!r}; known: {list(ACTIONS)}")
        if kind == "sleep":
            float(arg or "x")  # ValueError: sleep needs seconds
        if kind == "raise" and arg and not hasattr(errno, arg):
            raise ValueError(f"failpoint {item!r}: {arg!r} is not an errno name (e.g. ENOSPC)")
        out[point] = (kind, arg)
    return out


def hit(spec: str, point: str) -> None:
    """Run the action configured for `point` in `spec` (Settings.failpoints), if any."""
    if not spec:
        return
    action = parse(spec).get(point)
    if action is None:
        return
    kind, arg = action
    log.warning("failpoint %s hit: %s%s (pid %d)", point, kind, f":{arg}" if arg else "", os.getpid())
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sleep":
        time.sleep(float(arg))
    elif arg:
        code = getattr(errno, arg)
        raise OSError(code, f"{os.strerror(code)} (failpoint {point})")
    else:
        raise FailpointError(f"failpoint {point}")
