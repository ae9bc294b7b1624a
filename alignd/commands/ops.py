"""Ops commands: versions and rollback, preference data in and out, simulated users, the demo and the report.

alignd versions [--json]             # versions with metrics, provenance, status
alignd rollback VERSION              # make an earlier version current again
alignd gc [--keep N] [--dry-run]     # delete old checkpoint folders (never current, parent, SFT, served ones)
alignd export --format hh --out F    # preference data out; `alignd import F` in
alignd export-model VERSION --out D  # a version as a standard HF folder (a LoRA adapter merged into its base)
alignd demo [--minutes 15]           # the whole loop from an empty directory, with a report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from alignd.commands.common import JsonOpt, app, console, open_redis
from core.config import get_settings


@app.command()
def versions(as_json: JsonOpt = False):
    """Policy versions with metrics, provenance, status and live arena win rates."""
    from store import registry

    _, r, _ = open_redis()
    listing = registry.describe(r)
    if as_json:
        print(json.dumps(listing, default=str))
        return
    from training.figures import measured_on, shown_kl

    table = Table(title=f"policy versions (current: v{listing['current']})")
    for col in ("version", "status", "source", "parent", "reward", "events", "annotators", "score", "kl", "arena"):
        table.add_column(col, no_wrap=True, min_width=len(col))  # a header is never cut to "vers…"
    # score and kl as recorded at publish: the bootstrap's greedy set or the gate's fresh sampled one
    table.add_column("measured on", overflow="fold", min_width=12)
    for v in listing["data"]:
        m = v.get("metrics") or {}
        live = v.get("live_win_rate")
        ann = v.get("annotators")
        table.add_row(
            str(v["version"]),
            v["status"],
            str(v.get("source")),
            str(v.get("parent")),
            str(v.get("reward_version")),
            str((v.get("feedback") or {}).get("events", "")),
            str(len(ann)) if isinstance(ann, (dict, list)) else "",
            f"{m['score/mean']:.3f}" if isinstance(m.get("score/mean"), float) else "",
            f"{shown_kl(m['kl_to_ref']):.3f}" if isinstance(m.get("kl_to_ref"), float) else "",
            f"{live['win_rate']:.2f} ({live['votes']})" if live else "",
            measured_on(m) if m else "",
        )
    console.print(table)


@app.command()
def rollback(version: Annotated[int, typer.Argument(help="the version to make current again")]):
    """Make an earlier version current again (registry compare-and-set, event "rollback")."""
    from store import registry
    from store.registry import RegistryConflict
    from workers.arena import rollback as do_rollback

    _, r, _ = open_redis()
    if registry.current_version(r) == version:  # as POST /admin/rollback: nothing changes, nothing is recorded
        console.print(f"version {version} is already current; nothing changed")
        return
    try:
        out = do_rollback(r, version, reason="alignd rollback")
    except (KeyError, RegistryConflict) as exc:
        console.print(f"[red]{exc.args[0] if exc.args else exc}")
        raise typer.Exit(2) from None
    console.print(f"[green]version {out['current']} is current again (was {out['previous']})")


@app.command()
def gc(
    keep: Annotated[
        int | None,
        typer.Option(min=1, help="newest versions of each kind kept besides the protected ones (ALIGND_GC_KEEP)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be deleted; delete nothing")] = False,
    as_json: JsonOpt = False,
):
    """Delete old checkpoint folders (vN, rm-vN) and orphaned .tmp-* folders; workers/gc.py lists what is kept."""
    from workers import gc as checkpoints_gc

    settings = get_settings()
    _, r, _ = open_redis(settings)
    run = checkpoints_gc.plan if dry_run else checkpoints_gc.collect
    result = run(r, settings, keep=keep or settings.gc_keep or 5)
    if as_json:
        print(json.dumps(result.as_dict() | {"dry_run": dry_run}))
        return
    for folder, why in sorted(result.keep.items()):
        console.print(f"keep   {folder}  ({why})")
    for folder in result.delete:
        console.print(f"{'would delete' if dry_run else 'deleted'} {folder}")
    console.print(f"{'would free' if dry_run else 'freed'} {result.bytes / 1e6:.1f} MB")


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="output file (.jsonl, or .jsonl.gz to compress)")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hh (Anthropic HH-RLHF), trl (prompt/chosen/rejected messages)"
            " or alignd (lossless: labels, margins, groups, provenance)",
        ),
    ] = "hh",
    as_json: JsonOpt = False,
):
    """Write the preference data derived from feedback (and imports) to a file."""
    from store.exchange import export_preferences

    if fmt not in ("hh", "trl", "alignd"):
        console.print(f"[red]unknown format {fmt!r}: use hh, trl or alignd")
        raise typer.Exit(2) from None
    _, r, _ = open_redis()
    counts = export_preferences(r, fmt, out)
    print(json.dumps(counts) if as_json else f"wrote {counts} to {out}")


@app.command("export-model")
def export_model(
    version: Annotated[int, typer.Argument(help="the policy version to export")],
    out: Annotated[Path, typer.Option(help="folder to write (must not exist)")],
    as_json: JsonOpt = False,
):
    """Write a version as a standard Hugging Face folder (weights, config, tokenizer): a LoRA version is merged into
    its base, so any HF tool loads it without peft or alignd. The folder's manifest.json says where it came from."""
    from store import registry
    from training.checkpoint import CheckpointError, verify_checkpoint, write_checkpoint
    from training.lora import BaseMismatch, adapter_base, load_policy

    settings = get_settings()
    _, r, _ = open_redis(settings)
    meta = registry.get_version(r, version)
    if meta is None:
        console.print(f"[red]version {version} is not in the registry: see `alignd versions`")
        raise typer.Exit(2) from None
    if out.exists():
        console.print(f"[red]{out} already exists: choose a new folder")
        raise typer.Exit(2) from None
    folder = settings.checkpoint(meta["path"])
    try:
        verify_checkpoint(folder)
        model, tokenizer = load_policy(folder, "cpu", resolve_base=settings.checkpoint, merge=True)
    except (CheckpointError, BaseMismatch, OSError) as exc:
        console.print(f"[red]cannot export v{version}: {exc}")
        raise typer.Exit(1) from None
    adapter = adapter_base(folder)
    manifest = {
        "source": "export",
        "version": version,
        "parent": meta.get("parent"),
        "exported_from": settings.stored_path(folder),
        "merged_adapter": adapter,
        "reward_version": meta.get("reward_version"),
        "metrics": meta.get("metrics") or {},
    }
    write_checkpoint(lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)), out, manifest)
    report = {
        "version": version,
        "out": str(out),
        "merged_adapter": adapter is not None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(
        json.dumps(report)
        if as_json
        else f"wrote v{version} to {out}" + (" (adapter merged into its base)" if adapter else "")
    )


@app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="HH-RLHF, UltraFeedback-binarized or alignd JSONL (plain or .gz)")],
    as_json: JsonOpt = False,
):
    """Import preference data; bad lines are reported by number and skipped; importing twice adds nothing."""
    from store.exchange import import_preferences

    if not path.is_file():
        console.print(f"[red]{path} is not a file")
        raise typer.Exit(2) from None
    _, r, _ = open_redis()
    report = import_preferences(r, path)
    if as_json:
        print(json.dumps(report))
    else:
        console.print({k: v for k, v in report.items() if k != "bad_lines"})
        for line_no, reason in report.get("bad_lines", [])[:50]:
            console.print(f"[yellow]line {line_no}: {reason}")
    if report.get("bad_lines") and not report.get("imported") and not report.get("duplicates"):
        raise typer.Exit(1) from None


def _admin_key(settings) -> str | None:
    """The admin key, for re-serving overlap items (ALIGND_ADMIN_KEY, else keys.json); None: no overlap."""
    if settings.admin_key:
        return settings.admin_key
    path = settings.home / "keys.json"
    return json.loads(path.read_text()).get("admin_key") if path.exists() else None


@app.command()
def simulate(
    users: Annotated[int, typer.Option(help="simulated users; styles dealt round-robin from --annotators")] = 8,
    minutes: Annotated[float, typer.Option(help="how long they chat")] = 1.0,
    url: Annotated[str, typer.Option(help="the alignd API")] = "http://127.0.0.1:8000",
    annotators: Annotated[
        str, typer.Option(help="styles: balanced, brevity, detail, strict")
    ] = "balanced,brevity,detail,strict",
    noise: Annotated[float, typer.Option(help="label-flip probability")] = 0.25,
    keys_file: Annotated[
        Optional[Path],
        typer.Option(
            "--keys",
            help="API keys, one per user: keys.json "
            "({'users': {key: user}}) or key:user lines "
            "(default ALIGND_API_KEYS)",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 8,
    rate: Annotated[
        Optional[float], typer.Option(help="chat requests per second, all users (default: no limit)")
    ] = None,
    red_team: Annotated[
        float, typer.Option(help="share of turns that red-team: a harmful request, four answers ranked")
    ] = 0.1,
    red_team_temperature: Annotated[
        float, typer.Option(help="sampling temperature of red-teaming turns (higher surfaces more failures to rank)")
    ] = 1.0,
):
    """Drive a running alignd with simulated annotators (thumbs, pairwise and rank feedback); prints JSON counts."""
    from alignd.simulate import SimConfig, read_keys_file
    from alignd.simulate import simulate as run

    settings = get_settings()
    if keys_file is not None:
        keyring = read_keys_file(keys_file)
    elif settings.user_keys():
        keyring = settings.user_keys()
    elif (settings.home / "keys.json").exists():
        keyring = read_keys_file(settings.home / "keys.json")
    else:
        console.print(
            "[red]no API keys: the server records the caller as the annotator, so each simulated user "
            "needs its own key; pass --keys FILE or set ALIGND_API_KEYS"
        )
        raise typer.Exit(2) from None
    cfg = SimConfig(
        url=url,
        users=users,
        seconds=minutes * 60,
        annotators=annotators,
        noise=noise,
        concurrency=concurrency,
        rate=rate,
        red_team=red_team,
        red_team_temperature=red_team_temperature,
    )
    try:
        counts = run(cfg, keyring, admin_key=_admin_key(settings))
    except ValueError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    print(json.dumps(counts))
    if not counts["requests"] and counts["errors"]["total"]:
        console.print(f"[red]no request succeeded against {url}: {counts['errors']}")
        raise typer.Exit(1) from None


@app.command()
def report(
    out: Annotated[Optional[Path], typer.Option(help="output folder (default ALIGND_HOME/report)")] = None,
    as_json: JsonOpt = False,
    compare: Annotated[Optional[Path], typer.Option(help="another run's report.json to compare with")] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            help="re-score every version on one evaluation set (--no-evaluate: the metrics recorded at publish)"
        ),
    ] = True,
    oracle: Annotated[
        Optional[bool],
        typer.Option("--oracle/--no-oracle", help="oracle win rate (default: for built-in-world models only)"),
    ] = None,
    eval_per_family: Annotated[int, typer.Option(help="evaluation prompts per task group")] = 40,
    sampled: Annotated[
        bool,
        typer.Option(
            "--sampled/--greedy", help="score sampled answers (temperature 1, what users get) or greedy ones"
        ),
    ] = True,
    suite: Annotated[
        Optional[list[Path]],
        typer.Option("--suite", help="grader suite file to score every version on (default: the cycle's eval.suites)"),
    ] = None,
):
    """Build the alignment report (HTML + PNG plots + JSON) from this deployment's registry and feedback log."""
    from alignd.report import ReportConfig, build_report
    from workers.cycle_config import load_cycle_config

    settings = get_settings()
    settings.apply_torch_threads()
    _, r, _ = open_redis(settings)
    other = json.loads(compare.read_text()) if compare else None
    try:
        suites = [str(p) for p in suite] if suite else load_cycle_config(settings).eval.suites
    except ValueError as exc:  # a bad cycle.json or suite file: say which, report nothing
        console.print(f"[red]{exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    cfg = ReportConfig(
        evaluate=evaluate,
        oracle=oracle,
        eval_per_family=eval_per_family,
        sampled=sampled,
        device=settings.torch_device(),
        suites=suites,
    )
    out = out or settings.home / "report"
    try:
        result = build_report(r, out, cfg, compare=other, settings=settings)
    except ValueError as exc:  # no version yet, or a bad --suite file (every bad line named)
        console.print(f"[red]{exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result, default=str))
    else:
        console.print(f"[green]report written to {out / 'report.html'}")


@app.command()
def demo(
    minutes: Annotated[float, typer.Option(help="wall-clock budget, bootstrap and report included")] = 15.0,
    seed: Annotated[int, typer.Option(help="the simulated people's draws; one seed per run when comparing runs")] = 0,
    annotators: Annotated[str, typer.Option(help="simulated annotator pool")] = "balanced,brevity,detail,strict",
    users: Annotated[int, typer.Option(help="simulated users")] = 8,
    cycles: Annotated[int, typer.Option(help="training cycles to complete at least")] = 3,
    as_json: JsonOpt = False,
    home: Annotated[Optional[Path], typer.Option(help="empty data directory (default: a new temporary one)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="report folder (default HOME/report)")] = None,
    compare_pools: Annotated[
        Optional[tuple[str, str]],
        typer.Option(help="run twice with these two pools (e.g. brevity detail) and compare"),
    ] = None,
    sft_seconds: Annotated[float, typer.Option(help="bootstrap SFT budget")] = 120.0,
    base: Annotated[
        Optional[Path], typer.Option(help="start from this HF causal-LM folder instead of the built-in SFT bootstrap")
    ] = None,
    rate: Annotated[float, typer.Option(help="simulated chat requests per second")] = 4.0,
    first_feedback: Annotated[int, typer.Option(help="feedback events before the first cycle")] = 300,
    min_feedback: Annotated[int, typer.Option(help="new feedback events before each later cycle")] = 100,
    cycle_config: Annotated[Optional[str], typer.Option(help="CycleConfig overrides as JSON")] = None,
    eval_per_family: Annotated[int, typer.Option(help="report evaluation prompts per task group")] = 40,
    graders_as_reward: Annotated[
        bool, typer.Option(help="labelled run: the built-in graders on training prompts join the policy update")
    ] = False,
):
    """From an empty data directory: bootstrap, serve, simulated users, training cycles with hot-swaps, report."""
    from alignd.demo import DemoConfig, brief, print_tables, run_compare, run_demo
    from alignd.report import ReportConfig

    cfg = DemoConfig(
        minutes=minutes,
        seed=seed,
        annotators=annotators,
        users=users,
        cycles=cycles,
        home=home,
        out=out,
        sft_seconds=sft_seconds,
        base=base,
        rate=rate,
        first_feedback=first_feedback,
        min_feedback=min_feedback,
        cycle_config=json.loads(cycle_config) if cycle_config else {},
        report=ReportConfig(eval_per_family=eval_per_family),
        graders_as_reward=graders_as_reward,
    )
    log = lambda msg: console.print(msg)  # noqa: E731
    try:
        if compare_pools and all(compare_pools):
            result = run_compare(cfg, compare_pools, log)
            summaries = result["runs"]
        else:
            summaries = [run_demo(cfg, log)]
    except (ValueError, RuntimeError, TimeoutError) as exc:
        console.print(f"[red]demo failed: {exc}")
        raise typer.Exit(1) from None
    for s in summaries:
        print_tables(s, console)
    if as_json:
        print(json.dumps([brief(s) for s in summaries] if len(summaries) > 1 else brief(summaries[0]), default=str))
