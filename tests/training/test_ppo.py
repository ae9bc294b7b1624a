"""PPO: log-prob parity with unpadded forwards and with `generate`, masking, KL, rewards, learning and exact resume."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from tests.utils.tiny import tiny_model, tiny_sft_model, tiny_tokenizer
from training.lora import LoRAConfig, add_adapter, reference_mode
from training.ppo import (
    AdaptiveKLController,
    PPOConfig,
    PPOTrainer,
    ValueModel,
    left_pad,
    mean_reward,
    response_mask,
    reward_model_fn,
    sequence_logprobs,
)
from training.reward import build_reward_model, raw_scores

ARCHS = ["gpt2", "llama"]
METRICS = (
    "reward",
    "kl",
    "entropy",
    "clip_frac",
    "approx_kl",
    "value_loss",
    "policy_loss",
    "response_length",
    "missing_eos_frac",
    "kl_coef",
    "generate_seconds",
    "train_seconds",
)


def lowercase_reward(prompts, responses) -> torch.Tensor:
    """A known reward: ASCII lowercase letters per response, in units of 8."""
    return torch.tensor([sum(c.isascii() and c.islower() for c in r) / 8 for r in responses])


def number_prompts(n: int, rng: random.Random) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Say a number near {rng.randrange(100)}."}] for _ in range(n)]


def prompt_ids(tok, prompts):
    return [
        tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        for p in prompts
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_of_left_padded_batch_match_unpadded_forwards(arch):
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is 7 plus 8? Please say."}]]
    ids = prompt_ids(tok, prompts)
    response = torch.randint(10, len(tok), (2, 5), generator=g)
    p_ids, p_mask = left_pad(ids, tok.pad_token_id)
    input_ids = torch.cat([p_ids, response], 1)
    attention_mask = torch.cat([p_mask, torch.ones_like(response)], 1)
    with torch.no_grad():
        batched, _ = sequence_logprobs(model, input_ids, attention_mask, 5)
        for i in range(2):
            seq = torch.tensor([ids[i] + response[i].tolist()])
            alone, _ = sequence_logprobs(model, seq, torch.ones_like(seq), 5)
            assert torch.allclose(batched[i], alone[0], atol=1e-5), (i, batched[i], alone[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_recomputed_logprobs_match_the_sampling_distribution_of_generate(arch):
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed=2)
    prompts = number_prompts(3, random.Random(0)) + [[{"role": "user", "content": "Hi"}]]
    p_ids, p_mask = left_pad(prompt_ids(tok, prompts), tok.pad_token_id)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=p_ids,
        attention_mask=p_mask,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=0.7,
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    response = out.sequences[:, p_ids.shape[1] :]
    logits = torch.stack(out.logits, 1) / 0.7  # (B, R, V) raw logits of each sampling step
    expected = torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    mask, _ = response_mask(response, [tok.eos_token_id])
    with torch.no_grad():
        got, _ = sequence_logprobs(model, out.sequences, torch.cat([p_mask, mask], 1), response.shape[1], 0.7)
    assert torch.allclose(got * mask, expected * mask, atol=1e-4)


def test_response_mask_keeps_the_first_eos_and_drops_what_follows():
    eos, pad = 2, 0
    response = torch.tensor([[5, 6, eos, pad, pad], [eos, 7, 8, eos, pad], [5, 6, 7, 8, 9]])
    mask, has_eos = response_mask(response, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=100)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl2.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl2.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))


@pytest.mark.parametrize("arch", ARCHS)
def test_kl_is_exactly_zero_when_the_policy_is_the_reference(arch):
    tok = tiny_tokenizer()
    policy = tiny_sft_model(arch)
    trainer = PPOTrainer(
        PPOConfig(batch_size=4, mini_batch_size=2, max_new_tokens=12),
        policy,
        copy.deepcopy(policy),
        lowercase_reward,
        tok,
    )
    torch.manual_seed(0)
    ro = trainer.rollout(number_prompts(4, random.Random(0)))
    assert torch.equal(ro.old_logp, ro.ref_logp)
    assert float(ro.old_logp.abs().sum()) > 0
    metrics = trainer.step(number_prompts(4, random.Random(1)))
    assert metrics["kl"] == 0.0
    # after one update the policy has moved, and the next rollout shows it
    assert trainer.step(number_prompts(4, random.Random(2)))["kl"] != 0.0


def test_rewards_put_the_score_at_the_last_action_and_penalise_missing_eos():
    tok = tiny_tokenizer()
    policy = tiny_sft_model("gpt2")  # answers "The answer is N.<|end|>" in about 7 tokens

    def constant(prompts, responses):
        return torch.full((len(responses),), 0.5)

    prompts = number_prompts(8, random.Random(0))
    for max_new, mode, expect_eos in ((3, "replace", False), (3, "add", False), (16, "replace", True)):
        cfg = PPOConfig(batch_size=8, mini_batch_size=4, max_new_tokens=max_new, missing_eos_mode=mode)
        trainer = PPOTrainer(cfg, policy, copy.deepcopy(policy), constant, tok)
        torch.manual_seed(0)
        ro = trainer.rollout(prompts)
        assert bool(ro.has_eos.any()) == expect_eos
        last = ro.mask.sum(1) - 1
        final = ro.rewards[torch.arange(8), last]  # KL is 0 here: only the score remains
        expected = torch.where(ro.has_eos, torch.tensor(0.5), torch.tensor(-1.0 if mode == "replace" else -0.5))
        assert torch.allclose(final, expected)
        assert ro.rewards.sum().item() == pytest.approx(final.sum().item())
        assert torch.all(ro.mask[:, 0] == 1) and torch.all(ro.advantages[ro.mask == 0] == 0)
        if expect_eos:  # responses are decoded without EOS or padding, which the chat template adds back
            ended = [r for r, e in zip(ro.responses, ro.has_eos) if e]
            assert ended and all(r and "<|end|>" not in r and "<|pad|>" not in r for r in ended), ended


@pytest.mark.parametrize("arch", ARCHS)
def test_step_with_a_reward_model_updates_policy_and_critic_only(arch):
    tok = tiny_tokenizer()
    policy, ref = tiny_sft_model(arch), tiny_sft_model(arch)
    rm = build_reward_model(tiny_model(arch, seed=5), tok)
    before = {k: v.clone() for k, v in policy.named_parameters()}
    ref_before = {k: v.clone() for k, v in ref.named_parameters()}
    trainer = PPOTrainer(
        PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=10, lr=1e-3, critic_lr=1e-3),
        policy,
        ref,
        reward_model_fn(rm, tok),
        tok,
    )
    critic_before = {k: v.clone() for k, v in trainer.value_model.named_parameters()}
    metrics = trainer.step(number_prompts(4, random.Random(0)))
    for key in METRICS:
        assert math.isfinite(metrics[key]), key
    assert 1 <= metrics["response_length"] <= 10 and metrics["step"] == 1
    assert any(not torch.equal(v, before[k]) for k, v in policy.named_parameters())
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.named_parameters())
    assert any(not torch.equal(v, critic_before[k]) for k, v in trainer.value_model.named_parameters())


def test_critic_initialised_from_the_reward_model_starts_at_its_score():
    tok = tiny_tokenizer()
    rm = build_reward_model(tiny_model("llama", seed=6), tok)
    critic = ValueModel.from_model(rm)
    prompt, response = [{"role": "user", "content": "Say a number."}], "The answer is 3."
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        v = critic(ids, torch.ones_like(ids))[0, -1]
    assert v.item() == pytest.approx(raw_scores(rm, tok, [prompt], [response]).item(), abs=1e-5)


def test_leave_one_out_baseline_scores_each_answer_against_its_siblings():
    tok = tiny_tokenizer()
    policy = tiny_sft_model("gpt2")
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, max_new_tokens=16, samples_per_prompt=4, missing_eos_penalty=None)
    trainer = PPOTrainer(cfg, policy, copy.deepcopy(policy), lowercase_reward, tok)
    prompts = trainer.sample_prompts(number_prompts)
    assert len(prompts) == 8 and prompts[0] == prompts[3] and prompts[4] == prompts[7] and prompts[0] != prompts[4]
    torch.manual_seed(0)
    ro = trainer.rollout(prompts)
    final = ro.rewards[torch.arange(8), ro.mask.sum(1) - 1].view(2, 4)  # KL is 0: policy and reference are equal
    scores = ro.scores.view(2, 4)
    assert torch.allclose(final, scores - (scores.sum(1, keepdim=True) - scores) / 3, atol=1e-6)
    assert torch.allclose(final.sum(1), torch.zeros(2), atol=1e-5)  # a group's advantages balance out
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPOConfig(batch_size=8, mini_batch_size=4, samples_per_prompt=3)


@pytest.mark.parametrize("arch,lr,k", [("gpt2", 1e-3, 1), ("llama", 3e-3, 1), ("gpt2", 1e-3, 4)])
def test_ppo_raises_a_known_reward(arch, lr, k):
    tok = tiny_tokenizer()
    policy = tiny_model(arch, seed=0)  # random init: high entropy, so there is much to explore
    cfg = PPOConfig(
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=4,
        max_new_tokens=8,
        lr=lr,
        critic_lr=1e-3,
        kl_coef=0.02,
        missing_eos_penalty=None,
        samples_per_prompt=k,
        seed=0,
    )
    trainer = PPOTrainer(cfg, policy, copy.deepcopy(policy), lowercase_reward, tok)
    eval_prompts = number_prompts(64, random.Random(123))
    before = mean_reward(trainer, eval_prompts)
    assert trainer.train(number_prompts, 15, max_seconds=0.0) == [] and trainer.step_count == 0  # budget spent
    history = trainer.train(number_prompts, 15)
    after = mean_reward(trainer, eval_prompts)
    assert after > before + 0.2, (before, after)
    first = sum(m["reward"] for m in history[:2]) / 2
    last = sum(m["reward"] for m in history[-2:]) / 2
    assert last > first, (first, last)
    assert history[-1]["kl"] > 0  # the gain is paid for in KL, as it should be


@pytest.mark.parametrize("arch", ARCHS)
def test_two_plus_two_steps_after_resume_equal_four_steps(arch, tmp_path):
    tok = tiny_tokenizer()
    cfg = PPOConfig(
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        max_new_tokens=8,
        lr=1e-3,
        critic_lr=1e-3,
        kl_target=1.0,
        kl_horizon=100,
        seed=7,
    )  # adaptive KL, so its state matters too

    def fresh():
        policy = tiny_sft_model(arch)
        return PPOTrainer(cfg, policy, copy.deepcopy(policy), lowercase_reward, tok)

    straight = fresh()
    straight_metrics = straight.train(number_prompts, 4)

    first = fresh()
    first.train(number_prompts, 2)
    first.save_state(tmp_path / "state")
    first.save_state(tmp_path / "state")  # saving again replaces the folder cleanly
    resumed = PPOTrainer.load_state(tmp_path / "state", ref=tiny_sft_model(arch), reward_fn=lowercase_reward)
    assert resumed.step_count == 2
    resumed_metrics = resumed.train(number_prompts, 2)

    for (k, a), (k2, b) in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().items()):
        assert k == k2 and torch.equal(a, b), f"policy {k} differs"
    for (k, a), b in zip(straight.value_model.state_dict().items(), resumed.value_model.state_dict().values()):
        assert torch.equal(a, b), f"critic {k} differs"
    assert straight.kl_ctl.value == resumed.kl_ctl.value != cfg.kl_coef
    for a, b in zip(straight_metrics[2:], resumed_metrics):
        assert {k: v for k, v in a.items() if "seconds" not in k} == {k: v for k, v in b.items() if "seconds" not in k}
    assert (tmp_path / "state" / "policy" / "model.safetensors").exists()
    assert (tmp_path / "state" / "policy" / "tokenizer.json").exists()


def sevens_reward(prompts, responses) -> torch.Tensor:
    """A known reward an adapter can learn on the tiny SFT model: how many 7s its number has."""
    return torch.tensor([float(r.count("7")) for r in responses])


def say_a_number(n: int, rng: random.Random) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": "Say a number."}] for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_ppo_trains_only_adapters_against_the_base_as_reference(arch):
    """LoRA policy, reference = the same model with the adapter off, LoRA critic: the base weights never move, the
    reference's log-probs stay the base's, and a known reward still rises. (A LoRA without the output head barely
    moves a random-init tiny model's token distribution, so this starts from the tiny SFT model.)"""
    tok = tiny_tokenizer()
    base = tiny_sft_model(arch)
    # the adapter's init and the rollouts draw from the global generator, and sampling depends on the thread count:
    # both fixed here, not left to whatever the tests before this one did (that alone did not make the run the same
    # in every order — kernels differ in the last bit — hence a learning rate at which no seed collapses)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    frozen = copy.deepcopy(base)
    policy = add_adapter(base, LoRAConfig(rank=8, alpha=16))
    cfg = PPOConfig(
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=4,
        max_new_tokens=10,
        # 5e-3 collapsed one run in 16 (seeds 0-7, both archs) to answers without a 7; at 2e-3 all 16 rose by 0.19-1.0
        lr=2e-3,
        critic_lr=1e-3,
        kl_coef=0.02,
        missing_eos_penalty=None,
        samples_per_prompt=4,
        seed=0,
    )
    critic = ValueModel.from_model(frozen, lora=LoRAConfig(rank=8, alpha=16))  # frozen trunk: shared, not copied
    shared = {p.data_ptr() for p in frozen.parameters()}
    assert all(p.data_ptr() in shared for n, p in critic.trunk.named_parameters() if "lora_" not in n)
    trainer = PPOTrainer(cfg, policy, None, sevens_reward, tok, critic)
    base_before = {k: v.clone() for k, v in policy.named_parameters() if "lora_" not in k}
    eval_prompts = say_a_number(64, random.Random(0))
    before = mean_reward(trainer, eval_prompts)
    try:
        history = trainer.train(say_a_number, 40)
        after = mean_reward(trainer, eval_prompts)
    finally:
        torch.set_num_threads(threads)
    assert after > before + 0.1, (before, after)
    assert history[-1]["kl"] > 0
    assert all(torch.equal(v, base_before[k]) for k, v in policy.named_parameters() if "lora_" not in k)
    assert not any(p.requires_grad for n, p in critic.trunk.named_parameters() if "lora_" not in n)
    ids = torch.tensor(prompt_ids(tok, eval_prompts[:1]))
    with torch.no_grad(), reference_mode(policy):
        # the base is exactly what the critic shares its trunk with: training the critic's adapter left it alone
        torch.testing.assert_close(policy(input_ids=ids).logits, frozen(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="LoRA"):
        PPOTrainer(cfg, tiny_model(arch), None, sevens_reward, tok)
    with pytest.raises(ValueError, match="LoRA"):
        ValueModel.from_model(policy)


def test_grader_reward_adds_the_weighted_grader_score_on_suite_prompts_only():
    from training.graders import Item, Suite, parse_grader
    from training.ppo import grader_reward_fn

    exact = parse_grader({"type": "exact", "answer": "4"})
    items = (Item("a", "What is 2 plus 2?", exact), Item("b", [{"role": "user", "content": "Hi"}], exact))
    suite = Suite("s", "s", items)
    learned = lambda prompts, responses: torch.full((len(prompts),), 0.25)  # noqa: E731
    fn = grader_reward_fn(learned, [suite], weight=2.0)
    prompts = [
        [{"role": "user", "content": "What is 2 plus 2?"}],
        [{"role": "user", "content": "What is 2 plus 2?"}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Not a suite prompt"}],
    ]
    got = fn(prompts, ["4", "5", "4", "4"])
    assert got.tolist() == [2.25, 0.25, 2.25, 0.25]
