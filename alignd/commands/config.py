"""`alignd config`: the training cycle's configuration tree — every key, its type, its value and the reason for it.

    alignd config                     # the defaults, as a table
    alignd config --effective --json  # with ALIGND_HOME/cycle.json applied, as JSON

Keys are what `alignd train … --config`, ALIGND_HOME/cycle.json and the Celery task's overrides take, nested
(`{"ppo": {"lr": 3e-5}}`) or dotted (`{"ppo.lr": 3e-5}`); workers/cycle_config.py defines them.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from alignd.commands.common import JsonOpt, app, console
from core.config import get_settings


@app.command("config")
def config_cmd(
    as_json: JsonOpt = False,
    effective: Annotated[
        bool, typer.Option(help="values with ALIGND_HOME/cycle.json applied, instead of the defaults")
    ] = False,
):
    """Print the training cycle's configuration tree: every key with its type, value and reason."""
    from workers.cycle_config import describe_tree, load_cycle_config

    cfg = None
    if effective:
        try:
            cfg = load_cycle_config(get_settings())
        except ValueError as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2) from None
    tree = describe_tree(cfg)
    if as_json:
        print(json.dumps(tree, default=str))
        return
    out = Console()  # the tree is this command's output: stdout (messages go to stderr), wrapped to the width
    for name, why in tree["sections"].items():
        table = Table(title=f"{name}: {why}", title_justify="left", expand=True)
        for column in ("key", "type", "value", "why"):
            table.add_column(column, overflow="fold")
        for row in tree["keys"]:
            if row["key"].startswith(f"{name}."):
                table.add_row(row["key"], row["type"], repr(row["value"]), row["why"])
        out.print(table)
    top = Table(title="top level", title_justify="left", expand=True)
    for column in ("key", "type", "value", "why"):
        top.add_column(column, overflow="fold")
    for row in tree["keys"]:
        if "." not in row["key"]:
            top.add_row(row["key"], row["type"], repr(row["value"]), row["why"])
    out.print(top)
