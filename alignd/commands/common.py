"""What every `alignd` subcommand shares: the typer apps, the console, the Redis connection, report printing."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignd.logs import quiet_libraries
from core.config import Settings, get_settings

quiet_libraries()  # before any command imports transformers; every child process inherits it (alignd/logs.py)

app = typer.Typer(
    help="alignd: online alignment of a served chat model.", no_args_is_help=True, pretty_exceptions_enable=False
)
train_app = typer.Typer(
    help="Run one training step synchronously (SFT, reward model, PPO, a full cycle).", no_args_is_help=True
)
app.add_typer(train_app, name="train")
# Written to a file or a pipe, rich lays tables out for 80 columns and cuts their headers ("vers…"); a log has no
# width, so it gets one that fits every table alignd prints (COLUMNS, where set, still decides).
LOG_WIDTH = 200
console = Console(stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else LOG_WIDTH)

JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]


def open_redis(settings: Settings | None = None):
    """(url, client, embedded server we started or None) for this deployment (store.client.open_redis)."""
    from store.client import open_redis as _open

    return _open(settings or get_settings())


def child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment of a child process (API, Celery worker, beat, Flower): the same home and the same Redis."""
    return {**os.environ, "ALIGND_REDIS_URL": redis_url, "ALIGND_HOME": str(settings.home)}


@contextlib.contextmanager
def training_errors() -> Iterator[None]:
    """A training command that cannot run or publish (another run holds the lock or published first, no policy, no
    data) exits 2 with the reason."""
    from store.lock import LockBusy
    from store.registry import RegistryConflict
    from workers.job import CycleError

    try:
        yield
    except (LockBusy, CycleError, RegistryConflict) as exc:  # a conflict: a rollback or another run came first
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from None


def print_report(report: dict, as_json: bool, title: str) -> None:
    from workers.cycle import report_json

    if as_json:
        print(report_json(report))
        return
    console.print(f"[bold]{title}: {report.get('status', '')}")
    for k, v in report.items():
        if isinstance(v, (int, float, str)) or v is None:
            console.print(f"  {k}: {v}")
    for reason in report.get("reasons", []):
        console.print(f"  [yellow]gate: {reason}")


def print_eval(title: str, evaluation: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in evaluation.items():
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)
