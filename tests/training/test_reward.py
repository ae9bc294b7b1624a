"""Reward model: learns a clear synthetic preference, splits by prompt, normalises, reads the right token."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from tests.utils.tiny import tiny_model, tiny_tokenizer
from training.data import Comparison, Rated, prompt_key
from training.reward import (
    RewardConfig,
    _distinct_sample,
    batch_loss,
    bootstrap_weights,
    build_reward_model,
    format_conversation,
    load_reward_model,
    make_batches,
    raw_head_scores,
    raw_scores,
    save_reward_model,
    score,
    score_with_spread,
    split_by_prompt,
    train_reward_model,
)

ARCHS = ["gpt2", "llama"]


def good_bad_comparisons(n: int = 80, seed: int = 0) -> list[Comparison]:
    """The rule: people prefer responses that say "good" over ones that say "bad", whatever the number."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        prompt = [{"role": "user", "content": f"What is {a} plus {b}? ({i})" if i % 2 else f"Say a number near {i}."}]
        good, bad = f"{rng.randrange(100)} is good.", f"{rng.randrange(100)} is bad."
        out.append(Comparison(prompt=prompt, chosen=good, rejected=bad))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_model_learns_a_clear_preference(arch):
    tok = tiny_tokenizer()
    base = tiny_model(arch, seed=0)
    base_params = {k: v.detach().clone() for k, v in base.named_parameters()}
    cfg = RewardConfig(lr=1e-3, epochs=3, batch_size=8, heldout_fraction=0.25, seed=0)
    rm, metrics = train_reward_model(cfg, good_bad_comparisons(), base=base, tokenizer=tok)
    assert metrics["n_heldout"] > 0 and metrics["n_train"] + metrics["n_heldout"] == 80
    assert metrics["heldout_accuracy"] >= 0.9, metrics
    assert metrics["heldout_loss"] < math.log(2)  # better than chance
    for key in ("train_loss", "reward_mean", "reward_std", "pairs_per_s", "seconds"):
        assert math.isfinite(metrics[key]), key
    # every trunk parameter moved away from its initialisation (and the base model was not touched)
    trained = dict(rm.named_parameters())
    shared = [k for k in base_params if k in trained]
    assert len(shared) >= len(trained) - 1  # all but the new score head come from the causal LM
    for k in shared:
        if k == "transformer.ln_f.bias":  # adds the same constant to both rewards: its BT gradient is exactly 0
            continue
        assert not torch.equal(trained[k], base_params[k]), f"{k} did not change"
        assert torch.equal(dict(base.named_parameters())[k], base_params[k]), f"training modified the base's {k}"


def test_heldout_split_is_by_prompt_deterministic_and_stable():
    items = good_bad_comparisons(60)
    items += [Comparison(prompt=c.prompt, chosen="x", rejected="y") for c in items[:20]]  # repeated prompts
    train, held = split_by_prompt(items, 0.2, seed=1)
    train_keys, held_keys = {prompt_key(x.prompt) for x in train}, {prompt_key(x.prompt) for x in held}
    assert held and not train_keys & held_keys
    assert len(train) + len(held) == len(items)
    assert split_by_prompt(items, 0.2, seed=1) == (train, held)
    assert {prompt_key(x.prompt) for x in split_by_prompt(items, 0.2, seed=2)[1]} != held_keys
    # new feedback never moves an old prompt to the other side
    more = items + good_bad_comparisons(30, seed=9)
    held_more = {prompt_key(x.prompt) for x in split_by_prompt(more, 0.2, seed=1)[1]}
    assert held_keys <= held_more and not (train_keys & held_more)


def test_batches_keep_groups_together():
    items = good_bad_comparisons(40)
    for i, c in enumerate(items[:30]):
        c.group = f"g{i // 5}"  # six ranks of five pairs each
    batches = make_batches(items, batch_size=8, rng=random.Random(0))
    assert sorted(id(x) for b in batches for x in b) == sorted(id(x) for x in items)
    for g in {c.group for c in items if c.group}:
        holding = [i for i, b in enumerate(batches) if any(x.group == g for x in b)]
        assert len(holding) == 1, f"group {g} split over batches {holding}"
    assert all(len(b) <= 8 for b in batches)


@pytest.mark.parametrize("arch", ARCHS)
def test_score_reads_the_last_token_whatever_the_padding(arch):
    tok = tiny_tokenizer()
    rm = build_reward_model(tiny_model(arch, seed=3), tok)
    prompts = [[{"role": "user", "content": "Say a number."}], [{"role": "user", "content": "What is 2 plus 2?"}]]
    responses = ["7", "The answer is 4, and that is a good answer to give."]
    batched = raw_scores(rm, tok, prompts, responses)
    alone = torch.cat([raw_scores(rm, tok, [p], [r]) for p, r in zip(prompts, responses)])
    assert torch.allclose(batched, alone, atol=1e-5)
    # the same score as the head applied to the hidden state of the final token of an unpadded forward
    ids = tok(format_conversation(tok, prompts[0], responses[0]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        hidden = rm.base_model(**ids).last_hidden_state[:, -1]  # (1, H)
        direct = rm.score(hidden)[:, 0]
    assert torch.allclose(batched[:1], direct, atol=1e-5)


def test_normalisation_makes_references_standard_and_survives_saving(tmp_path):
    tok = tiny_tokenizer()
    data = good_bad_comparisons(40)
    refs = [(c.prompt, f"The answer is {i}.") for i, c in enumerate(data)]
    cfg = RewardConfig(lr=1e-3, epochs=1, batch_size=8)
    rm, metrics = train_reward_model(
        cfg, data, base=tiny_model("gpt2", seed=1), tokenizer=tok, reference_responses=refs
    )
    s = score(rm, tok, [p for p, _ in refs], [r for _, r in refs])
    assert s.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert s.std().item() == pytest.approx(1.0, abs=1e-3)
    raw = raw_scores(rm, tok, [p for p, _ in refs], [r for _, r in refs])
    assert raw.mean().item() == pytest.approx(metrics["reward_mean"], abs=1e-4)
    save_reward_model(rm, tok, tmp_path / "rm")
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")
    assert torch.allclose(score(loaded, loaded_tok, [p for p, _ in refs], [r for _, r in refs]), s, atol=1e-5)


def test_normalisation_scores_distinct_responses_and_caps_them():
    tok = tiny_tokenizer()
    data = good_bad_comparisons(40)
    refs = [(c.prompt, f"The answer is {i % 10}.") for i, c in enumerate(data)]
    repeated = refs * 3  # a ranking's texts recur in several of its pairs
    cfg = RewardConfig(lr=1e-3, epochs=1, batch_size=8)
    rm, metrics = train_reward_model(
        cfg, data, base=tiny_model("gpt2", seed=1), tokenizer=tok, reference_responses=repeated
    )
    distinct = list({(prompt_key(p), r): (p, r) for p, r in refs}.values())
    assert len(distinct) < len(repeated)
    raw = raw_scores(rm, tok, [p for p, _ in distinct], [r for _, r in distinct])
    assert raw.mean().item() == pytest.approx(metrics["reward_mean"], abs=1e-4)  # each text counted once
    assert raw.std().item() == pytest.approx(metrics["reward_std"], abs=1e-4)
    capped = _distinct_sample(repeated, 7, seed=0)
    assert len(capped) == 7 and len({(prompt_key(p), r) for p, r in capped}) == 7
    assert capped == _distinct_sample(repeated, 7, seed=0)  # seeded


def test_reward_model_from_a_model_folder(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_model("llama", seed=2)
    base.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    rm = build_reward_model(tmp_path / "sft", tok)
    for k, v in rm.base_model.state_dict().items():
        assert torch.equal(v, base.base_model.state_dict()[k]), k
    assert rm.config.pad_token_id == tok.pad_token_id and rm.config.num_labels == 1
    cfg = RewardConfig(lr=1e-3, epochs=1, batch_size=8)
    _, metrics = train_reward_model(cfg, good_bad_comparisons(16), base=tmp_path / "sft", tokenizer=tok)
    assert math.isfinite(metrics["train_loss"])


def test_tie_both_bad_and_rated_losses_are_finite_and_push_the_right_way():
    tok = tiny_tokenizer()
    rm = build_reward_model(tiny_model("gpt2", seed=4), tok)
    p = [{"role": "user", "content": "Say a number."}]
    batch = [
        Comparison(prompt=p, chosen="1 is good.", rejected="2 is bad.", margin=0.5),
        Comparison(prompt=p, chosen="3", rejected="4 plus 4", label="tie"),
        Comparison(prompt=p, chosen="no", rejected="bad bad", label="both_bad"),
        Rated(prompt=p, response="thank you", good=True),
        Rated(prompt=p, response="no no no", good=False),
    ]
    cfg = RewardConfig(pointwise_weight=0.25)
    loss, stats = batch_loss(rm, tok, batch, cfg)
    assert math.isfinite(loss.item()) and stats["weight"] == pytest.approx(3.5) and stats["n_pref"] == 1
    loss.backward()
    grads = [q.grad for q in rm.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # weight 0 ignores thumbs; an unknown label is refused
    loss0, stats0 = batch_loss(rm, tok, batch[:3] + batch[3:], RewardConfig(pointwise_weight=0.0))
    only_pairs, _ = batch_loss(rm, tok, batch[:3], RewardConfig(pointwise_weight=0.0))
    assert stats0["weight"] == 3 and loss0.item() == pytest.approx(only_pairs.item(), abs=1e-6)
    with pytest.raises(ValueError, match="'meh'"):
        batch_loss(rm, tok, [Comparison(prompt=p, chosen="a", rejected="b", label="meh")], cfg)
    # training on both_bad and thumbs-down only lowers those responses' raw rewards
    bad = [
        Comparison(
            prompt=[{"role": "user", "content": f"Say {i}."}], chosen=f"{i} no", rejected=f"{i} bad", label="both_bad"
        )
        for i in range(12)
    ]
    downs = [
        Rated(prompt=[{"role": "user", "content": f"Name {i}."}], response="no no", good=False) for i in range(12)
    ]
    before = raw_scores(rm, tok, [c.prompt for c in bad], [c.chosen for c in bad]).mean()
    cfg = RewardConfig(lr=1e-3, epochs=2, batch_size=8, heldout_fraction=0.0, pointwise_weight=1.0)
    trained, metrics = train_reward_model(cfg, bad, downs, base=rm, tokenizer=tok)
    after = raw_scores(trained, tok, [c.prompt for c in bad], [c.chosen for c in bad]).mean()
    assert after < before - 0.5 and math.isfinite(metrics["train_loss"])
    assert metrics["heldout_accuracy"] is None  # nothing held out


def test_a_budget_is_required_and_max_seconds_stops_training():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="budget"):
        train_reward_model(RewardConfig(epochs=None), good_bad_comparisons(4), base=tiny_model(), tokenizer=tok)
    t0 = time.perf_counter()
    cfg = RewardConfig(epochs=None, max_seconds=1.0, batch_size=4)
    _, metrics = train_reward_model(cfg, good_bad_comparisons(20), base=tiny_model(), tokenizer=tok)
    # without epochs the loop runs until the budget: it must return (a generous bound: the machine may be shared)
    assert time.perf_counter() - t0 < 30 and metrics["epochs"] >= 1


def test_a_ranking_scores_each_shared_response_once_with_the_same_loss():
    """The pairs of one ranking share responses; batch_loss scores each text once, and the loss is unchanged."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    rm = build_reward_model(tiny_model(), tok).eval()
    p = [{"role": "user", "content": "Rank these."}]
    ranked = ["best answer", "a fine answer", "worse", "worst of all"]
    pairs = [
        Comparison(prompt=p, chosen=ranked[i], rejected=ranked[j], group="r")
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    calls = []
    hook = rm.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    loss, stats = batch_loss(rm, tok, pairs, RewardConfig())
    hook.remove()
    assert calls == [4] and stats["n_pref"] == 6
    separate = [batch_loss(rm, tok, [c], RewardConfig())[0].item() for c in pairs]
    assert loss.item() == pytest.approx(sum(separate) / len(separate), abs=1e-5)


def test_identical_ties_are_skipped_in_training():
    """A tie between two identical responses has zero gradient; training leaves it out of n_train."""
    tok = tiny_tokenizer()
    data = good_bad_comparisons(20)
    same = [Comparison(prompt=c.prompt, chosen="same", rejected="same", label="tie") for c in data]
    cfg = RewardConfig(epochs=1, heldout_fraction=0.0, batch_size=8)
    _, metrics = train_reward_model(cfg, data + same, base=tiny_model(), tokenizer=tok)
    assert metrics["n_train"] == len(data)


def test_bootstrap_weights_are_ones_for_one_head_and_a_stable_resample_for_several():
    keys = [f"item {i}" for i in range(400)]
    assert torch.equal(bootstrap_weights(keys, 1, seed=0), torch.ones(400, 1))
    w = bootstrap_weights(keys, 4, seed=0)
    assert w.shape == (400, 4) and set(w.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(w, bootstrap_weights(keys, 4, seed=0))  # an item keeps its weights across epochs
    assert not torch.equal(w, bootstrap_weights(keys, 4, seed=1))
    assert abs(float(w.mean()) - 1.0) < 0.1  # each head sees about as much data as one plain head
    assert not torch.equal(w[:, 0], w[:, 1])  # and the heads see different resamples


@pytest.mark.parametrize("arch", ARCHS)
def test_several_heads_learn_report_their_spread_and_penalise_uncertain_rewards(arch, tmp_path):
    tok = tiny_tokenizer()
    cfg = RewardConfig(lr=1e-3, epochs=3, batch_size=8, heldout_fraction=0.25, seed=0, heads=3)
    rm, metrics = train_reward_model(cfg, good_bad_comparisons(), base=tiny_model(arch, seed=0), tokenizer=tok)
    assert rm.config.num_labels == 3 and metrics["heads"] == 3
    assert metrics["heldout_accuracy"] >= 0.9, metrics
    assert metrics["head_disagreement"] is not None and metrics["head_disagreement"] > 0
    prompts = [[{"role": "user", "content": "Say a number near 5."}]] * 2
    responses = ["7 is good.", "7 is bad."]
    heads = raw_head_scores(rm, tok, prompts, responses)
    assert heads.shape == (2, 3) and not torch.allclose(heads[:, 0], heads[:, 1])  # the heads differ
    mean, spread = score_with_spread(rm, tok, prompts, responses)
    assert torch.allclose(mean, score(rm, tok, prompts, responses)) and bool((spread > 0).all())
    penalised = score(rm, tok, prompts, responses, uncertainty_penalty=2.0)
    assert torch.allclose(penalised, mean - 2.0 * spread)
    save_reward_model(rm, tok, tmp_path / "rm")
    loaded, ltok = load_reward_model(tmp_path / "rm")
    assert torch.allclose(score(loaded, ltok, prompts, responses), mean, atol=1e-5)
    # warm start: the saved heads are kept when the head count matches, fresh ones otherwise
    again = build_reward_model(tmp_path / "rm", tok, heads=3)
    assert torch.equal(again.score.weight, loaded.score.weight)
    assert build_reward_model(tmp_path / "rm", tok, heads=2).config.num_labels == 2


def test_item_weights_scale_each_comparison_and_zero_weight_items_are_ignored():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    rm = build_reward_model(tiny_model(), tok).eval()
    data = good_bad_comparisons(6)
    spam = [Comparison(prompt=c.prompt, chosen=c.rejected, rejected=c.chosen, weight=0.0) for c in data[:3]]
    with_spam, stats = batch_loss(rm, tok, data + spam, RewardConfig())
    alone, _ = batch_loss(rm, tok, data, RewardConfig())
    assert with_spam.item() == pytest.approx(alone.item(), abs=1e-6) and stats["weight"] == pytest.approx(6.0)
    doubled = [Comparison(**{**c.to_dict(), "weight": 2.0}) for c in data[:2]] + data[2:]
    loss, stats = batch_loss(rm, tok, doubled, RewardConfig())
    each = [batch_loss(rm, tok, [c], RewardConfig())[0].item() for c in data]
    assert stats["weight"] == pytest.approx(8.0)
    assert loss.item() == pytest.approx((2 * each[0] + 2 * each[1] + sum(each[2:])) / 8, abs=1e-5)
    zero, stats = batch_loss(rm, tok, spam, RewardConfig())
    assert zero.item() == 0.0 and stats["weight"] == 0.0
