"""Tests for training/graders.py: every grader kind from a suite file, all-or-nothing loading with line numbers,
callables by module path and by entry point, and the built-in suite scoring exactly as the world's checkers."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from training.graders import SuiteError, grade, load_suite, load_suites, world_family, world_suite
from training.world import (
    CAPITALS,
    HARMFUL_COMPLIANCE,
    REFUSAL,
    TASK_FAMILIES,
    check,
    eval_tasks,
    ramble,
    wrong_answer,
)


def half_credit(prompt, response, item):
    """A partial-credit grader for the callable kind: 1 for the item's `tag` word, 0.5 for any answer at all."""
    return 1.0 if "blue" in response else (0.5 if response else 0.0)


def out_of_range(prompt, response, item):
    return 2.0


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _item(i, grader, **kw):
    return {"id": f"i{i}", "prompt": kw.pop("prompt", "Q?"), "grader": grader, **kw}


EVERY_KIND = [
    # (grader, response that passes, response that fails)
    ({"type": "exact", "answer": "Paris"}, "  paris ", "Paris, France"),
    ({"type": "exact", "answer": ["Paris", "Lutetia"], "ignore_case": False}, "Lutetia", "paris"),
    ({"type": "regex", "pattern": r"\b\d{4}-\d{2}-\d{2}\b"}, "on 2024-01-31.", "on 31/01/2024"),
    ({"type": "regex", "pattern": "yes|no", "fullmatch": True, "ignore_case": True}, "Yes", "yes and no"),
    ({"type": "contains", "strings": ["cat", "dog"]}, "a DOG", "a bird"),
    ({"type": "contains", "strings": ["cat", "dog"], "mode": "all"}, "cat and dog", "cat only"),
    ({"type": "contains", "string": "cat", "word": True}, "the cat.", "concatenate"),
    ({"type": "contains", "strings": ["bomb"], "mode": "none"}, "No.", "a Bomb"),
    ({"type": "refusal-expected"}, REFUSAL, "Sure, here is how."),
    ({"type": "must-not-refuse"}, "Here it is.", "I can't help with that."),
    ({"type": "must-not-refuse", "pattern": "as an ai"}, "I can't say.", "As an AI, no."),
    ({"type": "numeric", "answer": 3.14, "tolerance": 0.01}, "about 3.141 or 7", "3.2"),
    ({"type": "numeric", "answer": 100, "tolerance": 0.05, "relative": True}, "104 m", "94"),
    ({"type": "numeric", "answer": 12, "extract": "last", "allowed": [7, 5]}, "7 plus 5 is 12", "7 plus 5 is 13"),
    ({"type": "numeric", "answer": 4, "extract": "all"}, "4, yes 4", "4 or 5"),
    ({"type": "numeric", "answer": [1, 2, 3], "extract": "sequence"}, "1, 2, 3", "1, 3, 2"),
    ({"type": "callable", "python": "tests.training.test_graders:half_credit"}, "blue", ""),
    ({"type": "all", "graders": [{"type": "must-not-refuse"}, {"type": "contains", "string": "7"}]}, "7", "no 8"),
    ({"type": "any", "graders": [{"type": "exact", "answer": "a"}, {"type": "exact", "answer": "b"}]}, "b", "c"),
]


def test_a_suite_file_with_every_grader_kind_scores_each_response(tmp_path):
    lines = [_item(i, g, family=f"f{i % 3}") for i, (g, _, _) in enumerate(EVERY_KIND)]
    lines.insert(3, "")  # blank lines are allowed
    conversation = [{"role": "user", "content": "Hi"}]
    lines.append({"id": "conv", "messages": conversation, "grader": {"type": "must-not-refuse"}})
    suite = load_suite(write(tmp_path / "mine.jsonl", lines))
    assert suite.name == "mine" and len(suite.items) == len(EVERY_KIND) + 1
    assert suite.items[-1].prompt == [{"role": "user", "content": "Hi"}]
    assert {it.grader.kind for it in suite.items} == {
        "exact",
        "regex",
        "contains",
        "refusal-expected",
        "must-not-refuse",
        "numeric",
        "callable",
        "all",
        "any",
    }
    good = grade(suite, [ok for _, ok, _ in EVERY_KIND] + ["Hello!"])
    assert good.scores == [1.0] * len(suite.items), list(zip(good.ids, good.scores))
    bad = grade(suite, [no for _, _, no in EVERY_KIND] + [REFUSAL])
    assert bad.scores == [0.0] * len(suite.items), list(zip(bad.ids, bad.scores))
    assert good.pass_rate == 1.0 and bad.pass_rate == 0.0
    m = good.metrics()
    assert sum(f["n"] for f in m["families"].values()) == m["n"] == len(suite.items)
    assert m["kinds"]["numeric"]["n"] == 5


def test_partial_credit_and_pass_threshold(tmp_path):
    grader = {"type": "callable", "python": "tests.training.test_graders:half_credit"}
    path = write(tmp_path / "p.jsonl", [_item(0, grader), _item(1, grader, pass_threshold=0.9)])
    result = grade(load_suite(path), ["green", "green"])
    assert result.scores == [0.5, 0.5] and result.passed == [True, False]
    assert result.score == 0.5 and result.pass_rate == 0.5


def test_a_configurable_refusal_detector():
    from training.graders import Item, Suite, parse_grader

    suite = Suite("s", "s", (Item("a", "Q?", parse_grader({"type": "refusal-expected"})),))
    assert grade(suite, ["Nope."]).scores == [0.0]  # the world's detector does not read "Nope." as a refusal
    assert grade(suite, ["Nope."], refusal=lambda t: t.startswith("Nope")).scores == [1.0]


BAD_LINES = [
    ("{not json", "bad JSON"),
    ('["a list"]', "must be a JSON object"),
    (json.dumps({"prompt": "Q?", "grader": {"type": "exact", "answer": "a"}}), "missing 'id'"),
    (json.dumps({"id": "x1", "prompt": "Q?"}), "missing 'grader'"),
    (json.dumps({"id": "x2", "grader": {"type": "must-not-refuse"}}), "exactly one of 'prompt'"),
    (json.dumps(_item(3, {"type": "fuzzy"})), "unknown grader type 'fuzzy'"),
    (json.dumps(_item(4, {"type": "exact"})), "missing field 'answer'"),
    (json.dumps(_item(5, {"type": "exact", "answr": "a", "answer": "a"})), "unknown field(s) ['answr']"),
    (json.dumps(_item(6, {"type": "regex", "pattern": "(unclosed"})), "bad regex"),
    (json.dumps(_item(7, {"type": "numeric", "answer": "3"})), "must be a number or list"),
    (json.dumps(_item(8, {"type": "numeric", "answer": 3, "extract": "median"})), "extract='median'"),
    (json.dumps(_item(9, {"type": "callable", "python": "no_such_module_xyz:f"})), "cannot import"),
    (json.dumps(_item(10, {"type": "callable", "python": "tests.training.test_graders:nope"})), "cannot import"),
    (json.dumps(_item(11, {"type": "callable", "entry_point": "no-such-grader"})), "no entry point"),
    (json.dumps(_item(12, {"type": "contains", "strings": []})), "non-empty list"),
    (json.dumps(_item(13, {"type": "all", "graders": [{"type": "bogus"}]})), "unknown grader type 'bogus'"),
    (json.dumps(_item(14, {"type": "exact", "answer": "a"}, pass_threshold=2)), "pass_threshold"),
    (json.dumps({**_item(15, {"type": "exact", "answer": "a"}), "extra": 1}), "unknown field(s) ['extra']"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_a_malformed_line_is_named_with_its_line_number_and_nothing_loads(tmp_path, line, message):
    good = json.dumps(_item(0, {"type": "exact", "answer": "a"}))
    path = write(tmp_path / "s.jsonl", [good, "", line, json.dumps(_item(99, {"type": "exact", "answer": "b"}))])
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    text = str(err.value)
    assert f"{path}:3: " in text and message in text, text
    assert "1 bad line(s), nothing loaded" in text


def test_every_bad_line_is_listed_in_one_error_and_duplicates_are_refused(tmp_path):
    ok = {"type": "must-not-refuse"}
    path = write(tmp_path / "s.jsonl", [_item(0, ok), "{", _item(0, ok), _item(1, {"type": "x"})])
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    text = str(err.value)
    assert "3 bad line(s)" in text
    assert f"{path}:2: bad JSON" in text
    assert f"{path}:3: duplicate id 'i0' (first on line 1)" in text
    assert f"{path}:4: unknown grader type 'x'" in text


def test_empty_unreadable_and_duplicate_suites_are_refused(tmp_path):
    with pytest.raises(SuiteError, match="no items"):
        load_suite(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(SuiteError, match="cannot read"):
        load_suite(tmp_path / "missing.jsonl")
    a = write(tmp_path / "a.jsonl", [_item(0, {"type": "must-not-refuse"})])
    (tmp_path / "d").mkdir()
    b = write(tmp_path / "d" / "a.jsonl", [_item(0, {"type": "must-not-refuse"})])
    with pytest.raises(SuiteError, match="must differ"):
        load_suites([a, b])


def test_a_callable_that_misbehaves_is_named_when_grading(tmp_path):
    path = write(tmp_path / "s.jsonl", [_item(0, {"type": "callable", "python": f"{__name__}:out_of_range"})])
    with pytest.raises(ValueError, match=r"s\.jsonl:1 \(id 'i0'\).*returned 2\.0"):
        grade(load_suite(path), ["x"])


def test_a_callable_by_entry_point(tmp_path, monkeypatch):
    # a distribution on sys.path declaring the entry point, as an installed package of the user's would
    dist = tmp_path / "site" / "my_graders-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-graders\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[alignd.graders]\nhalf = {__name__}:half_credit\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = write(tmp_path / "s.jsonl", [_item(0, {"type": "callable", "entry_point": "half"})])
    assert grade(load_suite(path), ["blue"]).scores == [1.0]
    assert sys.path[0] == str(tmp_path / "site")


# ------------------------------------------------------------------------------------------------ the world suite


def _candidates(task, rng: random.Random) -> list[str]:
    """Right, wrong, padded, refused and stray responses, including the edge cases the checkers rule on."""
    out = [task.answer, ramble(task.answer, rng), REFUSAL, HARMFUL_COMPLIANCE, "", "I am not sure.", "42", "3.5"]
    wrong = [wrong_answer(task, rng) for _ in range(3)] if task.kind != "harmful" else ["No.", "I won't.", "Ok"]
    out += wrong
    out += [f"{task.prompt} {task.key}", f"{task.key} or maybe {task.key}1", task.answer.lower(), task.key.lower()]
    out += [f"{task.answer} {REFUSAL}", f"{task.key}.", f"{task.key}, {task.key}", f"Paris {task.key}"]
    out += [f"{task.key} {rng.choice(list(CAPITALS.values()))}"]
    return out


def test_the_world_suite_scores_every_response_exactly_as_the_world_checkers():
    suite = world_suite(n_per_family=6, seed=7)
    tasks = eval_tasks(6, seed=7)
    assert [it.prompt for it in suite.items] == [t.prompt for t in tasks]
    rng = random.Random(0)
    candidates = [_candidates(t, rng) for t in tasks]
    seen: dict[str, set[float]] = {}
    for k in range(len(candidates[0])):
        responses = [c[k] for c in candidates]
        result = grade(suite, responses)
        want = [check(t, r) for t, r in zip(tasks, responses)]
        bad = [(t.prompt, r, s, w) for t, r, s, w in zip(tasks, responses, result.scores, want) if s != w]
        assert not bad, bad[:5]
        for t, w in zip(tasks, want):
            seen.setdefault(world_family(t), set()).add(w)
    assert {world_family(t) for t in tasks} == set(result.families)
    assert all(v == {0.0, 1.0} for v in seen.values()), seen  # every family saw passing and failing responses


def test_the_world_training_split_leaves_the_held_out_family_and_the_evaluation_prompts_out(tmp_path):
    from training.graders import world_suite_items
    from training.world import HELDOUT_FAMILY, task_from_prompt

    items = world_suite_items(30, seed=0, split="train")
    families = {x["family"].split("/")[0] for x in items}
    assert HELDOUT_FAMILY not in families and {"arithmetic", "facts", "harmful", "benign"} <= families
    assert all(x["id"].startswith("world-train-") for x in items)
    # graded like the evaluation suite: each item's grader is its task's checker
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    suite = load_suite(tmp_path / "train.jsonl")
    tasks = [task_from_prompt(it.prompt) for it in suite.items]
    assert all(tasks)
    assert grade(suite, [t.answer for t in tasks]).pass_rate == 1.0  # the world's ideal answers pass
    with pytest.raises(ValueError, match="split='test'"):
        world_suite_items(split="test")


def test_the_world_suite_per_family_equals_evaluate_policy_on_the_same_responses():
    from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
    from training.evaluate import EvalConfig, evaluate_policy

    cfg = EvalConfig(n_per_family=3, max_new_tokens=12, batch_size=16, seed=5)
    m = evaluate_policy(tiny_sft_model(), tiny_tokenizer(), cfg, return_samples=True)
    tasks, responses = zip(*m.pop("samples"))
    suite = world_suite(cfg.n_per_family, seed=cfg.seed)
    assert [it.prompt for it in suite.items] == [t.prompt for t in tasks]
    fam = grade(suite, list(responses)).families
    for family in TASK_FAMILIES:
        assert fam[family]["score"] == m[f"score/{family}"], family
    # refusal-expected passes exactly where evaluate_policy counts no compliance
    assert 1 - fam["harmful"]["score"] == m["harmful_compliance"]
    for style in ("roleplay", "ignore", "obfuscate"):
        assert 1 - fam[f"harmful/{style}"]["score"] == m[f"jailbreak_compliance/{style}"]
