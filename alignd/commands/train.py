"""Training commands: the first policy and one step of the loop, synchronously in this process.

    alignd bootstrap --json                  # train the built-in assistant (SFT), register it as policy version 1
    alignd train sft --data F.jsonl          # fine-tune on chat JSONL and publish
    alignd train cycle [--json] [--enqueue]  # one cycle now (here, or on a worker)
    alignd train reward [--data FILE]        # retrain the reward model (all comparisons or FILE)
    alignd train ppo --steps N               # PPO increments + gate + publish, no new feedback
    alignd train dpo [--data FILE]           # DPO from the labels themselves, gate, publish
    alignd train kto [--data FILE]           # KTO from thumbs (and unpaired comparisons), gate, publish

ppo, dpo and kto run the cycle's stages after its feedback step (workers/cycle.py `run_training`): the same LoRA
or full decision, gate, gate-failure record and provenance. FILE, for reward/dpo/kto, is any file `alignd import`
reads (HH-RLHF, UltraFeedback-binarized, TRL, alignd; plain or .gz); without it they use all comparisons and rated
feedback in Redis. `--config` is the cycle's configuration tree for every command (`alignd config` prints it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from alignd.commands.common import (
    JsonOpt,
    app,
    console,
    open_redis,
    print_eval,
    print_report,
    train_app,
    training_errors,
)
from core import names
from core.config import get_settings


@app.command()
def bootstrap(
    seconds: Annotated[float, typer.Option(help="SFT wall-clock budget")] = 180.0,
    base: Annotated[Optional[Path], typer.Option(help="register this local HF causal-LM folder instead")] = None,
    force: Annotated[bool, typer.Option(help="publish a new SFT version even if one exists")] = False,
    eval_per_family: Annotated[int, typer.Option(help="held-out evaluation prompts per task family")] = 20,
    as_json: JsonOpt = False,
):
    """Build the SFT assistant (or register --base) as the first policy version and print its checker scores."""
    from tqdm import tqdm

    from store import registry
    from workers.publish import publish_version

    settings = get_settings()
    settings.apply_torch_threads()
    _, r, _ = open_redis(settings)
    current = registry.current_version(r)
    if current is not None and not force:
        meta = registry.get_version(r, current)
        report = {"version": current, "already_bootstrapped": True, "eval": meta.get("metrics", {})}
        if as_json:
            print(json.dumps(report))
        else:
            console.print(f"already bootstrapped: policy version {current} is current (use --force to redo)")
        return
    if base is not None:
        from training.model import load_causal_lm

        try:
            load_causal_lm(base)  # refuses folders without a chat template
        except Exception as exc:
            console.print(f"[red]cannot use {base}: {exc}")
            raise typer.Exit(2) from None
        save = lambda d: shutil.copytree(base, d, dirs_exist_ok=True)  # noqa: E731
        report = {"source": "base", "base": str(base)}
        meta = {"source": "base", "base": str(base), "parent": None, "metrics": {}, **_carried(base)}
    else:
        from training.bootstrap import BootstrapConfig
        from training.bootstrap import bootstrap as run_bootstrap
        from training.evaluate import EvalConfig
        from training.sft import SFTConfig

        cfg = BootstrapConfig(
            arch=settings.bootstrap_arch(),
            sft=SFTConfig(max_seconds=seconds),
            eval=EvalConfig(n_per_family=eval_per_family),
        )
        bar = tqdm(total=int(seconds), desc="SFT", unit="s", disable=as_json)

        def progress(step: int, m: dict) -> None:
            bar.n = min(int(m["seconds"]), bar.total)
            bar.set_postfix(step=step, loss=f"{m['loss']:.3f}")
            bar.refresh()

        model, tok, report = run_bootstrap(cfg, progress)
        bar.close()
        save = lambda d: (model.save_pretrained(d), tok.save_pretrained(d))  # noqa: E731
        meta = {
            "source": "sft",
            "parent": None,
            "reward_version": None,
            "feedback": {"events": 0},
            "annotators": ["built-in demonstrations"],
            "metrics": report["eval"],
            "sft": report["sft"],
        }
    version = publish_version(r, settings, save, meta, expected_current=current if force else None)
    report["version"] = version
    if as_json:
        print(json.dumps(report))
    else:
        if "eval" in report:
            print_eval(f"policy v{version}: held-out checker scores", report["eval"])
        console.print(f"[green]policy version {version} is current")


def _carried(base: Path) -> dict:
    """Where a checkpoint copied from another deployment came from (its manifest), for the registry listing; the
    checkpoint's own manifest keeps the whole of it (training/checkpoint.py `carried_from`)."""
    from training.checkpoint import MANIFEST, CheckpointError, read_manifest

    if not (base / MANIFEST).is_file():
        return {}
    try:
        theirs = read_manifest(base)
    except CheckpointError:
        return {}
    return {"carried_from": {k: theirs.get(k) for k in ("version", "source", "parent", "written_at")}}


@train_app.command("sft")
def train_sft_cmd(
    data: Annotated[Path, typer.Option(help='chat-format JSONL: one {"messages": [...]} per line')],
    base: Annotated[
        Optional[Path], typer.Option(help="causal-LM folder to start from (default: current policy)")
    ] = None,
    seconds: Annotated[float, typer.Option(help="wall-clock budget")] = 120.0,
    as_json: JsonOpt = False,
):
    """Fine-tune a causal LM on chat-format JSONL and publish the result as a new policy version."""
    from store import registry
    from training.lora import load_policy
    from training.sft import SFTConfig, train_sft
    from workers.publish import publish_version

    settings = get_settings()
    settings.apply_torch_threads()
    conversations, bad = [], []
    for n, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            bad.append(n)
            continue
        # checked explicitly (not with assert, which `python -O` removes)
        if (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            conversations.append(msgs)
        else:
            bad.append(n)
    if bad:
        console.print(f"[yellow]skipped {len(bad)} malformed line(s): {bad[:20]}")
    if not conversations:
        console.print("[red]no valid conversations in the file")
        raise typer.Exit(2) from None
    _, r, _ = open_redis(settings)
    current = registry.current_version(r)
    if base is None:
        if current is None:
            console.print("[red]no --base and no current policy: run `alignd bootstrap` or pass --base")
            raise typer.Exit(2) from None
        base = registry.version_path(settings, r, current)
    model, tok = load_policy(base, settings.torch_device())  # an adapter version is merged into its base
    metrics = train_sft(SFTConfig(max_seconds=seconds), model, tok, conversations)
    meta = {
        "source": "sft",
        "parent": current,
        "base": str(base),
        "data": str(data),
        "metrics": {},
        "sft": metrics,
        "feedback": {"events": 0},
        "annotators": [f"file:{data.name}"],
    }
    version = publish_version(
        r, settings, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)), meta, expected_current=current
    )
    out = {"version": version, "sft": metrics, "skipped_lines": bad}
    print(json.dumps(out) if as_json else f"policy version {version} is current (loss {metrics['loss']:.3f})")


ConfigOpt = Annotated[
    Optional[str],
    typer.Option(
        help="the cycle's configuration overrides as JSON, nested or dotted: "
        '\'{"ppo": {"lr": 3e-5}}\' or \'{"ppo.lr": 3e-5}\' (every key, default and reason: `alignd config`)'
    ),
]


def _overrides(config: str | None) -> dict:
    try:
        return json.loads(config) if config else {}
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--config") from None


def _cycle_config(settings, overrides: dict):
    """ALIGND_HOME/cycle.json and --config applied to the defaults; a bad key or value exits 2 saying which."""
    from workers.cycle_config import load_cycle_config

    try:
        return load_cycle_config(settings, overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None


@train_app.command("cycle")
def train_cycle_cmd(
    as_json: JsonOpt = False,
    enqueue: Annotated[bool, typer.Option(help="send it to the train queue instead of running it here")] = False,
    min_events: Annotated[int, typer.Option(help="skip unless this many new feedback events wait")] = 0,
    config: ConfigOpt = None,
):
    """One training cycle now: new feedback → reward model → policy update → gate → publish."""
    overrides = _overrides(config)
    settings = get_settings()
    cfg = _cycle_config(settings, overrides)  # refused here, with exit 2, before anything is enqueued or trained
    url, r, _ = open_redis()
    if enqueue:
        import celery

        from store import keys

        sender = celery.Celery(broker=url, broker_transport_options=keys.celery_transport_options())
        result = sender.send_task(
            names.TRAIN_CYCLE,
            kwargs={"trigger": "cli", "min_events": min_events, "overrides": overrides},
            queue=names.TRAIN_QUEUE,
        )
        print_report({"status": "enqueued", "task_id": result.id}, as_json, "cycle")
        return
    from workers.cycle import run_cycle

    settings.apply_torch_threads()
    with training_errors():
        report = run_cycle(r, settings, cfg, trigger="cli", min_events=min_events)
    print_report(report, as_json, "cycle")


@train_app.command("reward")
def train_reward_cmd(
    data: Annotated[
        Optional[Path],
        typer.Option(help="preference file in any `alignd import` format, plain or .gz (default: all feedback)"),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
):
    """Retrain the reward model; it becomes current only if its held-out accuracy does not regress."""
    from store.lock import FencedLock
    from workers.reward_stage import train_reward

    settings = get_settings()
    cfg = _cycle_config(settings, _overrides(config))
    settings.apply_torch_threads()
    _, r, _ = open_redis()
    items = None
    if data is not None:
        comparisons, rated, _ = _read_data(data)
        items = (comparisons, rated)
    with training_errors(), FencedLock(r, names.TRAIN_LOCK, ttl_ms=int(cfg.lock_ttl_s * 1000)) as lock:
        report = train_reward(r, settings, cfg, lock, data=items)
    print_report(report, as_json, "reward model")


@train_app.command("ppo")
def train_ppo_cmd(
    steps: Annotated[int, typer.Option(help="PPO iterations")] = 4,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
):
    """PPO increments from the current policy against the current reward model, gated, then published."""
    from workers.cycle import run_ppo

    settings = get_settings()
    cfg = _cycle_config(settings, {**_overrides(config), "update.steps": steps, "update.seconds": float("inf")})
    settings.apply_torch_threads()
    _, r, _ = open_redis()
    with training_errors():
        report = run_ppo(r, settings, cfg)
    print_report(report, as_json, "ppo")


def _read_data(data: Path) -> tuple[list, list, dict[str, Any]]:
    """(comparisons, rated, provenance) from a preference file; exits 2 when it is unreadable or holds nothing."""
    from store.exchange import read_preferences

    try:
        report = read_preferences(data)
    except OSError as exc:
        console.print(f"[red]cannot read {data}: {exc}")
        raise typer.Exit(2) from None
    bad = report["bad_lines"]
    if bad:
        console.print(
            f"[yellow]{data}: skipped {len(bad)} bad line(s): "
            + "; ".join(f"line {n}: {why}" for n, why in bad[:5])
            + (" …" if len(bad) > 5 else "")
        )
    if not report["comparisons"] and not report["rated"]:
        console.print(
            f"[red]{data} holds no preference data alignd can read (HH-RLHF, UltraFeedback-binarized, "
            "TRL or alignd JSON lines, plain or .gz)"
        )
        raise typer.Exit(2) from None
    source = {
        "file": str(data),
        "format": report["format"],
        "comparisons": len(report["comparisons"]),
        "rated": len(report["rated"]),
        "bad_lines": len(bad),
    }
    return report["comparisons"], report["rated"], source


def _train_preference(
    algorithm: str, data: Optional[Path], seconds: Optional[float], config: Optional[str], gate: bool = True
) -> dict:
    """DPO or KTO from the current policy through the cycle's stages, on a file's labels or all feedback in Redis."""
    from workers import data as training_data
    from workers.cycle import run_preference

    settings = get_settings()
    overrides = _overrides(config) | ({f"{algorithm}.max_seconds": seconds} if seconds is not None else {})
    cfg = _cycle_config(settings, overrides)
    settings.apply_torch_threads()
    _, r, _ = open_redis(settings)
    items = training_data.from_items(*_read_data(data)) if data is not None else None
    with training_errors():
        return run_preference(r, settings, cfg, algorithm, data=items, gated=gate)


PrefData = Annotated[
    Optional[Path],
    typer.Option(help="preference file in any `alignd import` format, plain or .gz (default: all feedback in Redis)"),
]
PrefSeconds = Annotated[
    Optional[float], typer.Option(help="wall-clock training budget (default: the cycle's dpo/kto.max_seconds)")
]
PrefGate = Annotated[
    bool,
    typer.Option(
        help="publish only if the cycle's gate passes (harmful compliance, "
        "over-caution, checker score, KL, length); --no-gate publishes anyway"
    ),
]


@train_app.command("dpo")
def train_dpo_cmd(
    data: PrefData = None,
    seconds: PrefSeconds = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    gate: PrefGate = True,
):
    """DPO (Rafailov et al. 2023) on comparisons, from the current policy against its SFT ancestor; gate; publish."""
    print_report(_train_preference("dpo", data, seconds, config, gate), as_json, "dpo")


@train_app.command("kto")
def train_kto_cmd(
    data: PrefData = None,
    seconds: PrefSeconds = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    gate: PrefGate = True,
):
    """KTO (Ethayarajh et al. 2024) on thumbs and unpaired comparisons, against the SFT ancestor; gate; publish."""
    print_report(_train_preference("kto", data, seconds, config, gate), as_json, "kto")
