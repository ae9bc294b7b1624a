"""store/exchange.py: export in three formats, import of HH-RLHF / UltraFeedback / TRL / alignd, idempotency."""

from __future__ import annotations

import gzip
import json

import pytest
from pydantic import TypeAdapter

from store import feedback as fb
from store.comparisons import all_comparisons
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from store.exchange import export_preferences, import_preferences, read_preferences

BODY = TypeAdapter(fb.FeedbackIn)
LIMITS = fb.FeedbackLimits(per_minute=10_000, per_day=100_000, max_comment_chars=100)


def seed(r) -> None:
    """Feedback of every kind: pref, tie, both_bad, rank margins, thumbs pair, unpaired thumb, unicode."""
    convo = [
        {"role": "system", "content": "Réponds brièvement."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3? \n\nHuman: tricky"},
    ]
    texts = ["6", "six 🙂", "7", "I cannot help with that."]
    for cid, n, user in (("p", 2, "alice"), ("t", 2, "alice"), ("b", 2, "bob"), ("k", 4, "alice"), ("h", 3, "bob")):
        save_completion(
            r,
            CompletionRecord(
                id=cid,
                user=user,
                messages=convo,
                version=2,
                choices=[
                    ChoiceRecord(index=i, text=f"{texts[i]} ({cid})", finish_reason="stop", version=2 - i % 2)
                    for i in range(n)
                ],
            ),
        )
    bodies = [
        ("p", "alice", {"type": "pairwise", "winner": 1}),
        ("t", "alice", {"type": "pairwise", "winner": "tie"}),
        ("b", "bob", {"type": "pairwise", "winner": "both_bad"}),
        ("k", "alice", {"type": "rank", "ranking": [3, 1, 0, 2]}),
        ("h", "bob", {"type": "thumbs", "choice": 0, "value": "up"}),
        ("h", "bob", {"type": "thumbs", "choice": 1, "value": "down"}),
        ("h", "admin", {"type": "thumbs", "choice": 2, "value": "down"}),
    ]
    for cid, user, body in bodies:
        fb.submit_feedback(
            r, BODY.validate_python({"completion_id": cid, **body}), user=user, limits=LIMITS, is_admin=user == "admin"
        )


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.jsonl.gz"])
def test_alignd_export_import_round_trip_is_lossless(r, tmp_path, name):
    seed(r)
    before = all_comparisons(r)
    counts = export_preferences(r, "alignd", tmp_path / name)
    assert counts["written"] == len(before[0]) + len(before[1]) == 1 + 1 + 1 + 6 + 1 + 1
    r.flushdb()
    report = import_preferences(r, tmp_path / name)
    assert report == {"format": "alignd", "imported": counts["written"], "duplicates": 0, "bad_lines": []}
    assert all_comparisons(r) == before


def test_importing_twice_or_into_the_source_store_adds_nothing(r, tmp_path):
    seed(r)
    path = tmp_path / "prefs.jsonl"
    export_preferences(r, "alignd", path)
    before = all_comparisons(r)
    report = import_preferences(r, path)
    assert report["imported"] == 0 and report["duplicates"] == len(before[0]) + len(before[1])
    assert all_comparisons(r) == before


def test_hh_and_trl_exports_keep_preferences_and_skip_what_they_cannot_say(r, tmp_path):
    seed(r)
    comparisons, _ = all_comparisons(r)
    prefs = [c for c in comparisons if c.label == "pref"]
    for fmt in ("hh", "trl"):
        counts = export_preferences(r, fmt, tmp_path / f"{fmt}.jsonl")
        assert counts["written"] == len(prefs)
        assert counts["skipped"] == {"tie": 1, "both_bad": 1, "rated": 1}
    lines = [json.loads(line) for line in open(tmp_path / "hh.jsonl")]
    assert all(line["chosen"].startswith("\n\nSystem: Réponds") for line in lines)
    r.flushdb()
    for fmt in ("hh", "trl"):
        report = import_preferences(r, tmp_path / f"{fmt}.jsonl")
        assert report["format"] == fmt and report["bad_lines"] == []
    imported, _ = all_comparisons(r)
    got = {
        fmt: sorted(
            (json.dumps(c.prompt), c.chosen, c.rejected) for c in imported if c.annotator == f"import:{fmt}.jsonl"
        )
        for fmt in ("hh", "trl")
    }
    want = sorted((json.dumps(c.prompt), c.chosen, c.rejected) for c in prefs)
    # the HH text of a prompt that itself contains "\n\nHuman:" is ambiguous; the rest comes back exactly
    assert got["trl"] == want
    assert [g[1:] for g in got["hh"]] == [w[1:] for w in want]


def hh(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


def test_hh_rlhf_file_imports_with_bad_lines_reported_by_number(r, tmp_path):
    lines = [
        json.dumps({"chosen": hh("Hi", "Hello!"), "rejected": hh("Hi", "Go away.")}),
        "",
        json.dumps({"chosen": hh("Capital of France?", "Paris"), "rejected": hh("Capital of Spain?", "Paris")}),
        "{not json",
        json.dumps({"chosen": hh("a", "b") + hh("c", "d"), "rejected": hh("a", "b") + hh("c", "e")}),
        json.dumps({"chosen": "Human: no leading blank line\n\nAssistant: ok", "rejected": hh("x", "y")}),
        json.dumps({"chosen": hh("same", "same"), "rejected": hh("same", "same")}),
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = import_preferences(r, path)
    assert report["format"] == "hh" and report["imported"] == 2 and report["duplicates"] == 0
    assert [n for n, _ in report["bad_lines"]] == [3, 4, 6, 7]
    assert "different conversations" in report["bad_lines"][0][1] and "JSON" in report["bad_lines"][1][1]
    comparisons, _ = all_comparisons(r)
    assert [c.annotator for c in comparisons] == ["import:hh.jsonl"] * 2
    assert comparisons[1].prompt == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert (comparisons[1].chosen, comparisons[1].rejected) == ("d", "e")
    again = import_preferences(r, path)
    assert again["imported"] == 0 and again["duplicates"] == 2
    assert all_comparisons(r)[0] == comparisons


def test_ultrafeedback_binarized_gz_imports_with_scores_and_bad_lines(r, tmp_path):
    def uf(prompt, chosen, rejected, sc, sr, **extra):
        return json.dumps(
            {
                "prompt": prompt,
                "prompt_id": "x",
                "score_chosen": sc,
                "score_rejected": sr,
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
                **extra,
            }
        )

    lines = [
        uf("Name a colour.", "Blue.", "Banana.", 9.0, 2.5),
        uf("Say hi.", "Hi!", "Hello!", 7, 7),
        uf("Reversed?", "worse", "better", 3, 8),
        json.dumps(
            {
                "prompt": "Mismatch",
                "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            }
        ),
        json.dumps([1, 2, 3]),
    ]
    path = tmp_path / "uf.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    report = import_preferences(r, path)
    assert report["format"] == "ultrafeedback" and report["imported"] == 2
    assert [n for n, _ in report["bad_lines"]] == [3, 4, 5]
    comparisons, _ = all_comparisons(r)
    assert [(c.chosen, c.label, c.meta["score_chosen"]) for c in comparisons] == [
        ("Blue.", "pref", 9.0),
        ("Hi!", "tie", 7),
    ]
    assert comparisons[0].prompt == [{"role": "user", "content": "Name a colour."}]
    assert import_preferences(r, path)["imported"] == 0


def test_unrecognised_file_imports_nothing_and_says_why(r, tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n" + "garbage\n")
    report = import_preferences(r, path)
    assert report["format"] is None and report["imported"] == 0 and [n for n, _ in report["bad_lines"]] == [1, 2]
    assert r.dbsize() == 0


@pytest.mark.parametrize("fmt", ["alignd", "hh", "trl"])
def test_read_preferences_gives_what_an_import_would_store_without_a_store(r, tmp_path, fmt):
    seed(r)
    path = tmp_path / f"{fmt}.jsonl.gz"
    export_preferences(r, fmt, path)
    report = read_preferences(path)
    r.flushdb()
    imported = import_preferences(r, path)
    assert report["format"] == imported["format"] == fmt and report["bad_lines"] == []
    assert (report["comparisons"], report["rated"]) == all_comparisons(r)
    assert len(report["comparisons"]) == (10 if fmt == "alignd" else 8) and len(report["rated"]) == (
        1 if fmt == "alignd" else 0
    )


def test_read_preferences_of_a_gzipped_hh_file_and_of_plain_comparison_dicts(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"chosen": hh("Hi", "Hello! ✓"), "rejected": hh("Hi", "Go away.")}) + "\n\n{oops\n")
    report = read_preferences(path)
    assert report["format"] == "hh" and [n for n, _ in report["bad_lines"]] == [3]
    assert [(c.prompt, c.chosen, c.label) for c in report["comparisons"]] == [
        ([{"role": "user", "content": "Hi"}], "Hello! ✓", "pref")
    ]
    legacy = tmp_path / "pairs.jsonl"  # what `alignd train reward --data` read before: dicts without a kind
    legacy.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "3+3?"}], "response": "6", "good": True})
        + "\n"
        + json.dumps({"chosen": hh("a", "b")})
        + "\n"
    )
    report = read_preferences(legacy)
    assert report["format"] == "alignd" and [n for n, _ in report["bad_lines"]] == [3]
    assert report["comparisons"][0].chosen == "4" and report["comparisons"][0].annotator == "import:pairs.jsonl"
    assert report["rated"][0].good is True
