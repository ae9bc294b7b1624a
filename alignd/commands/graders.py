"""Grader suites from the command line (training/graders.py): validate a suite file, write the built-in one, score a
policy version on suites.

alignd graders check FILE [FILE …] [--json]      # validate: counts per family and grader kind, or every bad line
alignd graders world --out FILE [--per-family N]  # the built-in world's checkers as a suite file (an example)
alignd eval --suite FILE [--suite F2] [--version N]  # score a registry version on suites (greedy); JSON
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from alignd.commands.common import JsonOpt, app, console, open_redis
from core.config import get_settings

graders_app = typer.Typer(help="Grader suites: your own programmatic checks (validate, write the built-in one).")
app.add_typer(graders_app, name="graders")


def _load(paths: list[Path]):
    from training.graders import SuiteError, load_suites

    try:
        return load_suites(paths)
    except SuiteError as exc:
        typer.echo(str(exc), err=True)  # unwrapped: every bad line whole, with its file:line
        raise typer.Exit(1) from None


@graders_app.command("check")
def check_cmd(
    files: Annotated[list[Path], typer.Argument(help="suite files (JSONL, one item per line)")],
    as_json: JsonOpt = False,
):
    """Validate suite files: print the items per family and grader kind, or every bad line (exit 1, nothing used)."""
    counts = [s.counts() for s in _load(files)]
    if as_json:
        print(json.dumps(counts))
        return
    for c in counts:
        fams = ", ".join(f"{k} {n}" for k, n in c["families"].items())
        kinds = ", ".join(f"{k} {n}" for k, n in c["kinds"].items())
        print(f"{c['path']}: {c['items']} items ok — families: {fams}; graders: {kinds}")


@graders_app.command("world")
def world_cmd(
    out: Annotated[Path, typer.Option(help="suite file to write (JSONL)")],
    per_family: Annotated[int, typer.Option(help="prompts per family (13 groups)")] = 20,
    seed: Annotated[int, typer.Option(help="seed of the prompts drawn (eval: training.world.eval_tasks)")] = 1234,
    split: Annotated[
        str,
        typer.Option(help="eval: the evaluation set; train: prompts drawn as for training, held-out family left out"),
    ] = "eval",
):
    """Write the built-in world's checkers as a grader suite: the file format, by example (--split train: a suite
    to use graders as reward on, whose prompts are not the evaluation's)."""
    from training.graders import WORLD_SPLITS, world_suite_items

    if split not in WORLD_SPLITS:
        raise typer.BadParameter(f"expected one of {WORLD_SPLITS}", param_hint="--split")
    items = world_suite_items(per_family, seed, split)
    out.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {len(items)} items to {out}")


@app.command("eval")
def eval_cmd(
    suite: Annotated[list[Path], typer.Option("--suite", help="suite file; repeat for several")],
    version: Annotated[Optional[int], typer.Option(help="policy version (default: the current one)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="longest response generated per prompt")] = 48,
    batch_size: Annotated[int, typer.Option(help="prompts generated together")] = 32,
):
    """Score a policy version on grader suites (greedy responses); prints JSON: the version and, per suite, n,
    pass_rate, score and both per family and per grader kind."""
    import torch

    from store import registry
    from training.checkpoint import CheckpointError, verify_checkpoint
    from training.evaluate import EvalConfig, evaluate_suites, json_safe
    from training.lora import BaseMismatch, load_policy

    suites = _load(suite)
    settings = get_settings()
    settings.apply_torch_threads()
    _, r, _ = open_redis(settings)
    version = version if version is not None else registry.current_version(r)
    meta = registry.get_version(r, version) if version is not None else None
    if meta is None:
        console.print(f"[red]no policy version {version}: see `alignd versions`")
        raise typer.Exit(2)
    folder = settings.checkpoint(meta["path"])
    try:
        verify_checkpoint(folder)
        model, tok = load_policy(folder, settings.torch_device(), resolve_base=settings.checkpoint)
    except (CheckpointError, BaseMismatch, OSError) as exc:
        console.print(f"[red]cannot load v{version}: {exc}")
        raise typer.Exit(1) from None
    ecfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    with torch.no_grad():
        scores = evaluate_suites(model, tok, suites, ecfg)
    print(json.dumps(json_safe({"version": version, "suites": scores, "max_new_tokens": max_new_tokens})))
