"""Export and import of preference data as JSON lines (plain or .gz): `alignd export` / `alignd import`.

Lines are written with JSON's \\u escapes for non-ASCII text, so any string (even one a UTF-8 file could not hold)
survives the round trip.

Export formats (`export_preferences`):
- "hh":     Anthropic HH-RLHF, {"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": "…"} — "pref" pairs only
            (a system turn is written as "\\n\\nSystem: …"; HH has no place for labels, margins or provenance).
- "trl":    TRL's conversational preference format, {"prompt": [messages], "chosen": [assistant message],
            "rejected": [assistant message]} — "pref" pairs only.
- "alignd": everything, lossless: {"kind": "comparison", prompt, chosen, rejected, label, margin, group, source,
            annotator, meta} and {"kind": "rated", prompt, response, good, group, source, annotator, meta}.

Import (`import_preferences`) reads HH-RLHF, UltraFeedback-binarized ({"prompt": str, "chosen": [messages],
"rejected": [messages], "score_chosen", "score_rejected"}), TRL (as exported above) and alignd's own format,
detected from the first line that parses, and the feedback-log archive's vote lines (store/archive.py:
{"kind": "vote", "event", "completion"}, restored as votes). Every line is validated; a bad line is reported by
number and skipped.
Each item is stored under a hash of its content, so importing a file twice adds nothing (nor does importing an
alignd export into the store it came from). Imported items reach training through
`store.comparisons.all_comparisons`, with annotator "import:<file name>" (or the one an alignd line carries).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, field_validator

from core.records import Comparison, Rated
from store import archive, keys
from store.comparisons import all_comparisons, feedback_comparisons

ExportFormat = Literal["hh", "trl", "alignd"]
IMPORT_BATCH = 500  # items per insert script call
ROLES = ("system", "user", "assistant")
HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
HH_NAMES = {v: k for k, v in HH_ROLES.items()}
_HH_SPLIT = re.compile(r"\n\n(Human|Assistant|System):[ ]?")


class BadLine(ValueError):
    """A line that cannot be imported; the message is the reason shown to the user."""


# --- writing


def _hh_text(messages: list[dict[str, str]]) -> str:
    return "".join(f"\n\n{HH_NAMES[m['role']]}: {m['content']}" for m in messages)


def _open_write(path: Path):
    return gzip.open(path, "wt", encoding="utf-8") if path.name.endswith(".gz") else open(path, "w", encoding="utf-8")


def export_preferences(r: redis.Redis, fmt: ExportFormat, out: Path) -> dict[str, Any]:
    """Write all preference data (latest votes + imported) to `out` (.gz compresses); returns counts."""
    if fmt not in ("hh", "trl", "alignd"):
        raise ValueError(f"unknown export format {fmt!r}: use 'hh', 'trl' or 'alignd'")
    out = Path(out)
    comparisons, rated = all_comparisons(r)
    skipped = {"tie": 0, "both_bad": 0, "rated": 0}
    written = 0
    tmp = out.with_name(out.name + ".tmp")
    with _open_write(tmp) as f:
        for c in comparisons:
            if fmt == "alignd":
                line = {"kind": "comparison", **c.stored()}
            elif c.label != "pref":
                skipped[c.label] += 1
                continue
            elif fmt == "hh":
                prompt = _hh_text(c.prompt)
                line = {
                    "chosen": prompt + _hh_text([{"role": "assistant", "content": c.chosen}]),
                    "rejected": prompt + _hh_text([{"role": "assistant", "content": c.rejected}]),
                }
            else:
                line = {
                    "prompt": c.prompt,
                    "chosen": [{"role": "assistant", "content": c.chosen}],
                    "rejected": [{"role": "assistant", "content": c.rejected}],
                }
            f.write(json.dumps(line) + "\n")
            written += 1
        for s in rated:
            if fmt != "alignd":
                skipped["rated"] += 1
                continue
            f.write(json.dumps({"kind": "rated", **s.stored()}) + "\n")
            written += 1
    os.replace(tmp, out)  # a reader never sees a half-written export
    return {
        "format": fmt,
        "path": str(out),
        "written": written,
        "comparisons": len(comparisons),
        "rated": len(rated),
        "skipped": skipped if fmt != "alignd" else {},
    }


# --- validating one line of each format (each returns the item to store, with its "kind")


def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadLine(f"{what} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadLine(f"{what}[{i}] must be a message {{'role': user|assistant|system, 'content': str}}")
        if not all(isinstance(v, str) for v in m.values()):
            raise BadLine(f"{what}[{i}] has a non-string field")
    return [dict(m) for m in value]


def _pref(
    prompt: list[dict[str, str]],
    chosen: str,
    rejected: str,
    name: str,
    fmt: str,
    label: str = "pref",
    meta: dict | None = None,
) -> dict[str, Any]:
    if chosen == rejected:
        raise BadLine("chosen and rejected responses are identical")
    return {
        "kind": "comparison",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "label": label,
        "margin": 0.0,
        "group": None,
        "source": f"import:{name}",
        "annotator": f"import:{name}",
        "meta": {"format": fmt, **(meta or {})},
    }


def _hh_turns(text: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(text, str) or not text.strip():
        raise BadLine(f"{what} must be a non-empty string")
    if not text.startswith("\n\n"):
        text = "\n\n" + text  # some copies of HH drop the leading blank line
    parts = _HH_SPLIT.split(text)
    if parts[0].strip():
        raise BadLine(f"{what} must start with 'Human:'")
    turns = [
        {"role": HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise BadLine(f"{what} must be a conversation ending with an 'Assistant:' turn")
    return turns


def _parse_hh(obj: dict, name: str) -> dict[str, Any]:
    chosen, rejected = _hh_turns(obj.get("chosen"), "chosen"), _hh_turns(obj.get("rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise BadLine("chosen and rejected continue different conversations")
    if not any(t["role"] == "user" for t in chosen[:-1]):
        raise BadLine("the conversation has no 'Human:' turn")
    return _pref(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], name, "hh")


def _split_conversation(value: Any, what: str) -> tuple[list[dict[str, str]], str]:
    messages = _messages(value, what)
    if messages[-1]["role"] != "assistant":
        raise BadLine(f"{what} must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _parse_ultrafeedback(obj: dict, name: str) -> dict[str, Any]:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadLine("prompt must be a non-empty string")
    history, chosen = _split_conversation(obj.get("chosen"), "chosen")
    rejected_history, rejected = _split_conversation(obj.get("rejected"), "rejected")
    if history != rejected_history:
        raise BadLine("chosen and rejected continue different conversations")
    users = [m["content"] for m in history if m["role"] == "user"]
    if not users or users[-1] != prompt:
        raise BadLine("the last user message of chosen is not the prompt")
    meta: dict[str, Any] = {}
    label = "pref"
    scores = [obj.get("score_chosen"), obj.get("score_rejected")]
    if any(s is not None for s in scores):
        if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores):
            raise BadLine("score_chosen and score_rejected must both be numbers")
        if scores[0] < scores[1]:
            raise BadLine(f"score_chosen {scores[0]} is below score_rejected {scores[1]}")
        label = "tie" if scores[0] == scores[1] else "pref"  # equal scores say neither is better
        meta = {"score_chosen": scores[0], "score_rejected": scores[1]}
    return _pref(history, chosen, rejected, name, "ultrafeedback", label, meta)


def _parse_trl(obj: dict, name: str) -> dict[str, Any]:
    prompt = _messages(obj.get("prompt"), "prompt")
    answers = []
    for what in ("chosen", "rejected"):
        messages = _messages(obj.get(what), what)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise BadLine(f"{what} must be a list of one assistant message")
        answers.append(messages[0]["content"])
    return _pref(prompt, answers[0], answers[1], name, "trl")


class _AligndBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: list[dict[StrictStr, StrictStr]] = Field(min_length=1)
    group: StrictStr | None = None
    source: StrictStr | None = None
    annotator: StrictStr | None = None
    meta: dict[StrictStr, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _roles(cls, v: list[dict[str, str]]) -> list[dict[str, str]]:
        for i, m in enumerate(v):
            if m.get("role") not in ROLES or "content" not in m:
                raise ValueError(f"message {i} must have role user|assistant|system and a content")
        return v


class _AligndComparison(_AligndBase):
    kind: Literal["comparison"]
    chosen: StrictStr
    rejected: StrictStr
    label: Literal["pref", "tie", "both_bad"] = "pref"
    margin: float = Field(0.0, strict=False)  # an int margin is fine


class _AligndRated(_AligndBase):
    kind: Literal["rated"]
    response: StrictStr
    good: StrictBool


def _parse_alignd(obj: dict, name: str) -> dict[str, Any]:
    model = {"comparison": _AligndComparison, "rated": _AligndRated}.get(obj.get("kind"))
    if model is None:
        raise BadLine("kind must be 'comparison', 'rated' or 'vote'")
    try:
        item = model.model_validate(obj).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadLine(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    item["source"] = item["source"] if item["source"] is not None else f"import:{name}"
    item["annotator"] = item["annotator"] if item["annotator"] is not None else f"import:{name}"
    return item


PARSERS: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "alignd": _parse_alignd,
    "hh": _parse_hh,
    "ultrafeedback": _parse_ultrafeedback,
    "trl": _parse_trl,
}


def detect_format(obj: Any) -> str | None:
    """Which format a parsed line looks like (by its keys and their types), or None."""
    if not isinstance(obj, dict):
        return None
    if "kind" in obj:
        return "alignd"
    if isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str) and "prompt" not in obj:
        return "hh"
    if isinstance(obj.get("chosen"), list) and isinstance(obj.get("rejected"), list):
        if isinstance(obj.get("prompt"), str):
            return "ultrafeedback"
        if isinstance(obj.get("prompt"), list):
            return "trl"
    return None


# --- reading


def content_id(item: dict[str, Any]) -> str:
    """The id of an imported item: a hash of all of it (kind, texts, labels, provenance, meta)."""
    return hashlib.sha256(json.dumps(item, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _lines(path: Path):
    """(line number, parsed JSON or None, error or None) for each non-blank line; .gz is detected by its magic."""
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        line_no = 0
        while True:
            line_no += 1
            try:
                line = f.readline()
            except (OSError, EOFError) as exc:  # a truncated or corrupt .gz: nothing after this point is readable
                yield line_no, None, f"cannot read the file from here on ({exc})"
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line.decode("utf-8")), None
            except UnicodeDecodeError:
                yield line_no, None, "not valid UTF-8"
            except (ValueError, RecursionError) as exc:
                yield line_no, None, f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})"


INSERT_LUA = """
-- KEYS: 1 items hash, 2 order list; ARGV: id1, json1, id2, json2, …  (an id already present is a duplicate)
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    added = added + 1
  end
end
return added
"""


def _live_items(r: redis.Redis) -> set[str]:
    """Content ids of the store's feedback-derived items: an alignd export imported into the store it came from
    adds nothing."""
    comparisons, rated = feedback_comparisons(r)
    live = {content_id({"kind": "comparison", **c.stored()}) for c in comparisons}
    return live | {content_id({"kind": "rated", **s.stored()}) for s in rated}


def _restore(r: redis.Redis, obj: dict, report: dict[str, Any]) -> str | None:
    """Restore one archived vote; the reason it is a bad line, or None."""
    try:
        outcome = archive.restore_vote(r, *archive.parse_vote(obj))
    except archive.BadVote as exc:
        return str(exc)
    if outcome < 0:
        return "the vote's completion is neither in the line nor in the store"
    report["imported" if outcome else "duplicates"] += 1
    report["votes"] = report.get("votes", 0) + outcome
    return None


def import_preferences(r: redis.Redis, path: Path) -> dict[str, Any]:
    """Import a preference file; returns {"format", "imported", "duplicates", "bad_lines": [(line_no, reason)]}.

    Good lines are imported even when others are bad; run again after fixing the bad ones (the good ones are then
    duplicates and add nothing).
    """
    path = Path(path)
    name = path.name
    fmt = next((detect_format(obj) for _, obj, err in _lines(path) if err is None and detect_format(obj)), None)
    report: dict[str, Any] = {"format": fmt, "imported": 0, "duplicates": 0, "bad_lines": []}
    if fmt is None:
        report["bad_lines"] = [
            (n, err or "not a line of HH-RLHF, UltraFeedback, TRL or alignd format") for n, _, err in _lines(path)
        ]
        return report
    live: set[str] | None = None  # the store's own feedback-derived items, read at the first alignd item line
    insert = r.register_script(INSERT_LUA)
    batch: list[str] = []

    def flush() -> None:
        if batch:
            added = int(insert(keys=[keys.imported_items(), keys.imported_order()], args=batch))
            report["imported"] += added
            report["duplicates"] += len(batch) // 2 - added
            batch.clear()

    for line_no, obj, err in _lines(path):
        if err is None:
            line_fmt = detect_format(obj)
            if line_fmt != fmt:
                err = (
                    f"looks like {line_fmt} but the file is {fmt}"
                    if line_fmt
                    else f"not a line of the {fmt} format (expected keys missing)"
                )
        if err is None and obj.get("kind") == "vote":  # a feedback-log archive line (store/archive.py)
            err = _restore(r, obj, report)
            if err is None:
                continue
        if err is None:
            try:
                item = PARSERS[fmt](obj, name)
            except BadLine as exc:
                err = str(exc)
        if err is not None:
            report["bad_lines"].append((line_no, err))
            continue
        if live is None:
            live = _live_items(r) if fmt == "alignd" else set()
        item_id = content_id(item)
        if item_id in live:
            report["duplicates"] += 1
            continue
        batch += [item_id, json.dumps(item)]
        if len(batch) >= 2 * IMPORT_BATCH:
            flush()
    flush()
    return report


# --- reading a file without a store (`alignd train reward|dpo|kto --data FILE`)


def _with_kind(obj: Any) -> Any:
    """A comparison or rated dict without its "kind" (what `alignd train reward --data` read before any of the
    exchange formats) gets the kind its fields imply, so it parses as an alignd line; anything else is unchanged."""
    if not isinstance(obj, dict) or "kind" in obj or not isinstance(obj.get("prompt"), list):
        return obj
    if isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str):
        return {"kind": "comparison", **obj}
    if isinstance(obj.get("response"), str) and "good" in obj:
        return {"kind": "rated", **obj}
    return obj


def read_preferences(path: Path) -> dict[str, Any]:
    """Parse a preference file in any format `import_preferences` reads (plain or .gz) into records.

    Returns {"format", "comparisons": [...], "rated": [...], "bad_lines": [(line_no, reason)]}: `core.records`
    Comparison / Rated, with annotator "import:<file name>" unless a line names one.
    Nothing is stored; a bad line is reported and skipped, as on import.
    """
    path = Path(path)
    report: dict[str, Any] = {"format": None, "comparisons": [], "rated": [], "bad_lines": []}
    votes = []  # archived votes (store/archive.py): derived together at the end, as the store would
    for line_no, obj, err in _lines(path):
        if err is None:
            obj = _with_kind(obj)
            line_fmt = detect_format(obj)
            if report["format"] is None and line_fmt is not None:
                report["format"] = line_fmt  # the first line that parses decides, as on import
            if line_fmt is None or line_fmt != report["format"]:
                err = (
                    f"looks like {line_fmt} but the file is {report['format']}"
                    if line_fmt
                    else "not a line of HH-RLHF, UltraFeedback, TRL or alignd format"
                )
        if err is None and obj.get("kind") == "vote":
            try:
                votes.append(archive.parse_vote(obj))
                continue
            except archive.BadVote as exc:
                err = str(exc)
        if err is None:
            try:
                item = PARSERS[report["format"]](obj, path.name)
            except BadLine as exc:
                err = str(exc)
        if err is not None:
            report["bad_lines"].append((line_no, err))
            continue
        if item.pop("kind") == "comparison":
            report["comparisons"].append(Comparison.from_dict(item))
        else:
            report["rated"].append(Rated.from_dict(item))
    comparisons, rated = archive.votes_to_items(votes)
    report["comparisons"] += comparisons
    report["rated"] += rated
    return report
