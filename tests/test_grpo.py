"""Stage 05: the checkers on hand cases, GRPO's advantages, ratio clip, k3 and aggregations on
hand-computed values, pass@k, batched sampling, a frozen reference, the problem split, and tiny runs,
one of a variant (RLOO) added to the table by the test."""
import json
import ast
import random
import re
import types
import warnings

import pytest
import torch

import frozen
from conftest import load_stage, run_script

R = load_stage("05_grpo_reasoning")
P = load_stage("01_pretrain")


def reply(content, thinking="1 + 1 = 2", ended=True):
    return {"content": content, "thinking": thinking, "ended": ended, "wrote_other_turn": False}


ARITH = {"family": "arithmetic", "answer": 36}
TOWN = {"family": "multihop", "answer": "Esholm"}
COUNT = {"family": "countdown", "answer": 22, "numbers": [3, 5, 7]}


@pytest.mark.parametrize("problem, content, thinking, right", [
    (ARITH, "Answer: 36", "", True),
    (ARITH, "Answer: 036.", "", True),                       # a number is a number; a full stop is no answer
    (ARITH, "Answer: 35", "", False),
    (ARITH, "Answer: 36 coins", "", False),                  # the answer line holds the answer alone
    (ARITH, "36", "", False),                                # no answer line
    (ARITH, "Answer: 35\nAnswer: 36", "", False),            # hedging with two answers earns nothing
    (TOWN, "Answer: esholm", "", True),
    (TOWN, "Answer: Esholm town", "", False),
    (COUNT, "Answer: 3 * 5 + 7", "", True),                  # any valid expression counts
    (COUNT, "Answer: (7 - 5) * 11", "", False),              # 11 is not given
    (COUNT, "Answer: 3 * 7 + 3 - 2", "", False),             # 3 used twice, 2 not given
    (COUNT, "Answer: 5 * 5 - 3", "", False),                 # 5 used twice
    (COUNT, "Answer: 22", "", False),                        # the bare target, without working
    (COUNT, "Answer: 22", "3 * 5 = 15\n15 + 7 = 22", True),  # the target, with true steps over the numbers
    (COUNT, "Answer: 22", "3 * 5 = 16\n16 + 6 = 22", False),  # a false step
    (COUNT, "Answer: 22", "5 * 5 = 25\n25 - 3 = 22", False),  # 5 used twice in the steps
    (COUNT, "Answer: 22", "3 * 5 = 15\nso 15 + 7 = 22", False),  # every line must be a step
    (COUNT, "Answer: 21", "3 * 7 = 21", False),              # a true step that misses the target
    (COUNT, "Answer: 22 / 1", "", False),                    # division is not allowed
    (COUNT, "Answer: __import__('os')", "", False),          # nothing but arithmetic is evaluated
])
def test_checkers_on_hand_cases(problem, content, thinking, right):
    assert R.answer_correct(problem, reply(content, thinking)) is right


def test_a_malformed_expression_is_wrong_without_a_warning():
    """A model writes "7or 2", "7x" or a null byte; the checker says wrong and prints nothing per reply."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert R.answer_correct(COUNT, reply("Answer: 3 * 5 + 7or 2", "")) is False   # parses, with a warning
        assert R.answer_correct(COUNT, reply("Answer: 3 * 5 + 7x", "")) is False
        assert R.answer_correct(COUNT, reply("Answer: 3 * 5 +\x00 7", "")) is False
        assert R.answer_correct(COUNT, reply("Answer: " + "(" * 500 + "3" + ")" * 500, "")) is False
    assert not caught


def test_reward_reports_correctness_and_form_separately():
    assert R.reward(ARITH, reply("Answer: 36"), 0.1) == {"correct": 1.0, "format": 1.0, "total": 1.1}
    assert R.reward(ARITH, reply("Answer: 35"), 0.1) == {"correct": 0.0, "format": 1.0, "total": 0.1}
    assert R.reward(ARITH, reply("Answer: 36", thinking=None), 0.1)["total"] == 1.0   # no thinking span
    assert R.reward(ARITH, reply("Answer: 36", ended=False), 0.1)["format"] == 0.0


def test_group_advantages_on_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # mean 0.5; sample std sqrt(1/3) = 0.57735, so +-0.5 / 0.57735 = +-0.86603
    grpo = R.group_advantages(rewards)
    torch.testing.assert_close(grpo[0], torch.tensor([0.86603, -0.86603, -0.86603, 0.86603]), atol=2e-4, rtol=0)
    assert grpo[1].abs().max() == 0                      # an all-equal group carries no signal
    torch.testing.assert_close(R.group_advantages(rewards, scale_by_std=False)[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_k3_is_nonnegative_zero_at_equality_and_matches_hand_value():
    logp = torch.randn(1000)
    ref = torch.randn(1000)
    assert (R.k3(logp, ref) >= 0).all() and R.k3(logp, logp).abs().max() == 0
    # pi = 0.5, pi_ref = 0.25: 0.5 - log 0.5 - 1 = 0.19315
    value = R.k3(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25)))
    assert value.item() == pytest.approx(0.19315, abs=1e-5)


@pytest.mark.parametrize("rho, advantage, objective, clipped", [
    (1.5, 1.0, 1.2, True),     # a good token already made more likely: capped at 1 + eps
    (1.5, -1.0, -1.5, False),  # a bad token made more likely: the full penalty, never capped
    (0.5, -1.0, -0.8, True),   # a bad token already made less likely: capped at 1 - eps
    (0.5, 1.0, 0.5, False),    # a good token made less likely: the full loss of it
])
def test_clip_acts_on_the_right_side(rho, advantage, objective, clipped):
    logp = torch.log(torch.tensor([rho])).requires_grad_()
    value, flag = R.clipped_objective(logp, torch.zeros(1), torch.tensor([advantage]), 0.2, 0.2)
    assert value.item() == pytest.approx(objective, abs=1e-6) and bool(flag.item()) is clipped
    value.sum().backward()
    assert (logp.grad.abs().item() == 0) is clipped      # a clipped token sends no gradient


def test_clip_higher_widens_only_the_upper_side():
    value, _ = R.clipped_objective(torch.log(torch.tensor([1.5, 0.5])), torch.zeros(2),
                                   torch.tensor([1.0, -1.0]), 0.2, 0.28)
    torch.testing.assert_close(value, torch.tensor([1.28, -0.8]))


def test_aggregations_on_hand_values():
    per_token = torch.tensor([[1.0, 1.0, 9.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert R.aggregate(per_token, mask, "sequence", 4).item() == pytest.approx((1 + 2) / 2)
    assert R.aggregate(per_token, mask, "token", 4).item() == pytest.approx(4 / 3)
    assert R.aggregate(per_token, mask, "constant", 4).item() == pytest.approx(4 / 8)


def test_a_chunk_is_divided_by_the_whole_batch():
    """The issue's example: replies of 1, 1, 8 and 8 tokens with advantages [1, -1, 1, -1]. The first
    token's gradient is -A / 18 under the token mean (18 tokens in the batch), -A / (4 x its reply's
    length) under the sequence mean and -A / (4 x 8) under the constant, in one chunk or two."""
    lengths, adv = torch.tensor([1, 1, 8, 8]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).float()
    want = {"token": -adv / 18, "sequence": -adv / (4 * lengths), "constant": -adv / 32}
    for how, first in want.items():
        for chunks in ([[0, 1, 2, 3]], [[0, 1], [2, 3]]):
            logp = torch.zeros(4, 8, requires_grad=True)
            for c in chunks:
                R.aggregate(-adv[c, None] * logp[c], mask[c], how, 8, whole=(4, 18)).backward()
            torch.testing.assert_close(logp.grad[:, 0], first, msg=f"{how}, {len(chunks)} chunks")


def test_dynamic_sampling_keeps_a_group_only_if_its_accuracy_differs():
    """DAPO filters on accuracy: a group all right, split only by the form bonus, is dropped (its
    shaped rewards still differ); a group with one right reply is kept."""
    all_right = [{"correct": 1.0, "shaped": 1.1}, {"correct": 1.0, "shaped": 1.0}]
    mixed = [{"correct": 1.0, "shaped": 1.1}, {"correct": 0.0, "shaped": 0.1}]
    assert not R.informative(all_right) and R.informative(all_right, "shaped")
    assert R.informative(mixed)
    dapo, grpo = types.SimpleNamespace(variant="dapo"), types.SimpleNamespace(variant="grpo")
    assert not R.keeps_group(all_right, dapo) and R.keeps_group(mixed, dapo)
    assert R.keeps_group(all_right, grpo)   # the other variants train on every group


def test_overlong_penalty_and_pass_at_k_on_hand_values():
    assert [R.overlong_penalty(n, 64, 16) for n in (40, 48, 56, 64, 70)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert R.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert R.pass_at_k(4, 1, 2) == pytest.approx(0.5)    # 1 - C(3, 2) / C(4, 2)
    assert R.pass_at_k(4, 0, 4) == 0.0 and R.pass_at_k(4, 3, 2) == 1.0


def test_variants_differ_only_in_the_table():
    args = types.SimpleNamespace(clip_low=0.2, clip_high=0.2, beta=0.0, max_new_tokens=4)
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    losses = {}
    for variant in ("grpo", "drgrpo", "dapo"):
        args.variant = variant
        losses[variant] = R.rl_loss(logp, logp.detach(), logp.detach(), mask, adv, args)[0].item()
    # rho = 1 everywhere: -(mean over replies of their token means) = 0; the token mean -(2 - 1)/3;
    # Dr. GRPO's constant: -(2 - 1) / (2 * 4)
    assert losses["grpo"] == pytest.approx(0.0, abs=1e-7)
    assert losses["dapo"] == pytest.approx(-1 / 3)
    assert losses["drgrpo"] == pytest.approx(-1 / 8)



def test_the_table_sets_each_variants_advantages_clip_and_shaping():
    """Rewards [1, 0, 0, 1]: GRPO and DAPO divide the centred +-0.5 by the sample std sqrt(1/3), +-0.86603;
    Dr. GRPO keeps +-0.5. eps_high where --clip_high is not given: DAPO's 0.28, the others' eps_low 0.2.
    DAPO's overlong buffer is 0.25 x 8 = 2 tokens, so a 7-token reply loses (8 - 2 - 7) / 2 = 0.5 of its
    1.1; the others keep 1.1. Only expert iteration fine-tunes on the accepted replies."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    scaled, centred = torch.tensor([[1.0, -1.0, -1.0, 1.0]]) * 0.86603, torch.tensor([[0.5, -0.5, -0.5, 0.5]])
    record = {"total": 1.1, "reply": list(range(7))}
    want = {"grpo": (scaled, 0.2, 1.1, False), "drgrpo": (centred, 0.2, 1.1, False),
            "dapo": (scaled, 0.28, 0.6, False), "expert_iteration": (None, 0.2, 1.1, True)}
    for variant, (advantages, eps_high, shaped, fine_tunes) in want.items():
        args = types.SimpleNamespace(variant=variant, clip_low=0.2, max_new_tokens=8)
        if advantages is not None:
            torch.testing.assert_close(R.advantages_for(rewards, args), advantages, atol=2e-4, rtol=0)
        assert R.clip_high_for(args) == eps_high, variant
        assert R.shaped_reward(record, args) == pytest.approx(shaped), variant
        assert bool(R.fine_tunes_on_accepted(args)) is fine_tunes, variant
    dapo = ["--variant", "dapo", "--out", "/tmp/never_written/05"]
    assert R.parse_args(dapo).clip_high == 0.28
    assert R.parse_args(dapo + ["--clip_high", "0.3"]).clip_high == 0.3   # a given --clip_high wins


def test_rl_loss_reads_pi_old_in_the_ratio_pi_ref_in_the_kl_and_each_clip_on_its_side():
    """One reply of two tokens, rho = pi / pi_old = 1.5 and 0.5, A = +1, pi_ref = pi (k3 = 0), DAPO's eps
    0.2 / 0.28 and token mean: the first token is capped at 1 + 0.28, the second keeps 0.5, so the loss
    is -(1.28 + 0.5) / 2 = -0.89, one token of two clipped, mean k3 0. (pi_old in the KL would give k3 of
    0.0721 and 0.3069; pi_ref in the ratio, rho = 1 and a loss of -1; the clips swapped, -(1.2 + 0.5) / 2.)"""
    args = types.SimpleNamespace(variant="dapo", clip_low=0.2, clip_high=0.28, beta=0.5, max_new_tokens=2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old, ref, mask = torch.zeros(1, 2), logp.clone(), torch.ones(1, 2)
    loss, clip_fraction, kl = R.rl_loss(logp, old, ref, mask, torch.ones(1), args)
    assert loss.item() == pytest.approx(-0.89) and clip_fraction.item() == 0.5 and kl.item() == 0


def test_expert_iteration_fine_tunes_on_right_replies_only(monkeypatch):
    """A right reply (total 1.1) and a wrong one in the rewarded form (total 0.1): the next-token loss
    reads the right one alone."""
    seen, logprobs = [], R.token_logprobs
    monkeypatch.setattr(R, "token_logprobs", lambda m, prompts, replies, pad: seen.append(replies)
                        or logprobs(m, prompts, replies, pad))
    batch = [{"prompt": [1, 2, 3], "reply": [40, 41], "correct": 1.0, "total": 1.1},
             {"prompt": [1, 2, 3], "reply": [50, 51], "correct": 0.0, "total": 0.1}]
    model = tiny_model(6)
    args = types.SimpleNamespace(inner_steps=1, device="cpu")
    stats = R.expert_iteration_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, args, pad=0)
    assert seen == [[[40, 41]]] and stats["kept"] == 1


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = P.GPTConfig(vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64, seq_len=64)
    model = R.GPT(config)
    model.init_weights(seed)
    return model


def test_token_logprobs_match_one_sequence_at_a_time():
    model = tiny_model()
    prompts, replies = [[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21], [30, 31, 32, 33]]
    logp, mask, entropy = R.token_logprobs(model, prompts, replies, pad=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    for b, (p, r) in enumerate(zip(prompts, replies)):
        full = torch.log_softmax(model(torch.tensor([p + r]))[0], -1)
        want = [full[len(p) - 1 + j, t] for j, t in enumerate(r)]
        torch.testing.assert_close(logp[b, :len(r)], torch.stack(want), atol=1e-5, rtol=0)
    assert (entropy >= 0).all()


class Enc:
    """Just enough of a tokenizer for sample(): every special token is an id above 250."""
    def encode_single_token(self, t):
        return 250 + R.STOP_TOKENS.index(t)


def test_sampling_is_the_same_batched_or_one_row_at_a_time():
    model = tiny_model(1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3, 4]]
    args = types.SimpleNamespace(seed=1, max_new_tokens=12, device="cpu", gen_batch=64)
    batched = R.sample(model, Enc(), prompts, 3, args, 1.0, "t")
    args.gen_batch = 1
    alone = R.sample(model, Enc(), prompts, 3, args, 1.0, "t")
    assert batched == alone
    assert len({tuple(ids) for ids, _ in batched[1]}) > 1      # and the group's replies differ


def test_a_group_reads_its_prompt_once_and_samples_as_when_each_row_read_it(monkeypatch):
    """A group (or pass@k's samples) is n rows of one prompt: sample() reads each prompt once and copies
    its cache to the group's rows, and every row draws the reply it drew when each row read its prompt."""
    model = tiny_model(1)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3, 4]]
    args = types.SimpleNamespace(seed=1, max_new_tokens=12, device="cpu", gen_batch=64)
    sizes = []
    hook = model.embed.register_forward_hook(lambda m, inputs, out: sizes.append(out.size(0)))
    shared = R.sample(model, Enc(), prompts, 4, args, 1.0, "t")
    hook.remove()
    assert sizes[:2] == [3, 12]     # three prompts read, twelve rows decoded
    per_row = R.generate
    monkeypatch.setattr(R, "generate", lambda *a, **k: per_row(*a, **{**k, "share_prefill": False}))
    assert R.sample(model, Enc(), prompts, 4, args, 1.0, "t") == shared


def test_update_moves_the_policy_toward_rewarded_replies_and_leaves_the_reference():
    policy, reference = tiny_model(2), tiny_model(2)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.requires_grad_(False)
    args = types.SimpleNamespace(variant="grpo", group_size=2, batch_size=8, inner_steps=2, clip_low=0.2,
                                 clip_high=0.2, beta=0.04, max_new_tokens=4, device="cpu")
    good, bad = [40, 41, 42], [50, 51, 52]
    batch = [{"prompt": [1, 2, 3], "reply": good, "shaped": 1.0}, {"prompt": [1, 2, 3], "reply": bad, "shaped": 0.0}]
    before = R.token_logprobs(policy, [[1, 2, 3]] * 2, [good, bad], 0)[0].sum(1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = R.policy_update(policy, reference, optimizer, batch, args, pad=0)
    after = R.token_logprobs(policy, [[1, 2, 3]] * 2, [good, bad], 0)[0].sum(1)
    assert after[0] > before[0] and after[1] < before[1]
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    assert stats["kl"] >= 0


@pytest.mark.parametrize("variant", ["grpo", "dapo", "drgrpo"])   # sequence, token, constant
def test_the_gradient_does_not_depend_on_the_chunking(variant, monkeypatch):
    """Replies of 1, 1, 8 and 8 tokens, rewards [1, -1, 1, -1] in groups of 2: one chunk of 4 rows
    (batch_size 8) and two chunks of 2 (batch_size 4) give one gradient for every aggregation."""
    grads = []
    monkeypatch.setattr(R, "optimizer_step", lambda policy, optimizer: grads.append(
        torch.cat([p.grad.flatten() for p in policy.parameters()])))
    batch = [{"prompt": [1, 2, 3], "reply": list(range(40 + 10 * i, 40 + 10 * i + n)), "shaped": s}
             for i, (n, s) in enumerate(zip((1, 1, 8, 8), (1.0, -1.0, 1.0, -1.0)))]   # four different replies
    for batch_size in (8, 4):
        args = types.SimpleNamespace(variant=variant, group_size=2, batch_size=batch_size, inner_steps=1,
                                     clip_low=0.2, clip_high=0.2, beta=0.04, max_new_tokens=8, device="cpu")
        R.policy_update(tiny_model(3), tiny_model(3).requires_grad_(False), None, batch, args, pad=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["grpo", "drgrpo", "dapo"])   # sequence, constant, token; clip-higher
@pytest.mark.parametrize("inner_steps, beta", [(1, 0.04), (2, 0.04), (3, 0.0)])
def test_pi_old_is_the_first_inner_steps_own_pass(variant, inner_steps, beta, monkeypatch):
    """policy_update takes pi_old's log-probs from its first inner step's pass, detached (the weights move
    only after that step), where it used to run the policy once more without gradients (tests/frozen.py;
    TRL's GRPOTrainer also skips that pass for one iteration). Over one inner step or several (off-policy,
    the clip active): the same gradient at every step and the same statistics, bit for bit, one pass a
    chunk and an inner step fewer."""
    grads, passes = [], []
    step = R.optimizer_step
    monkeypatch.setattr(R, "optimizer_step", lambda policy, optimizer: grads.append(
        [p.grad.clone() for p in policy.parameters()]) or step(policy, optimizer))
    logprobs = R.token_logprobs
    monkeypatch.setattr(R, "token_logprobs", lambda m, *a: passes.append(m) or logprobs(m, *a))
    batch = [{"prompt": [1, 2, 3 + i % 3], "reply": list(range(40 + 7 * i, 40 + 7 * i + n)), "shaped": s}
             for i, (n, s) in enumerate(zip((1, 5, 8, 3, 6, 2), (1.0, -1.0, 0.5, 1.0, 0.0, 1.0)))]
    args = types.SimpleNamespace(variant=variant, group_size=2, batch_size=4, inner_steps=inner_steps,
                                 clip_low=0.2, clip_high=R.VARIANTS[variant].get("clip_high", 0.2), beta=beta,
                                 max_new_tokens=8, device="cpu")
    results = []
    for update in (R.policy_update, frozen.grpo_policy_update):
        policy, reference = tiny_model(4), tiny_model(5).requires_grad_(False)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05)   # large: the later steps' clip acts
        grads[:], passes[:] = [], []
        stats = update(policy, reference, optimizer, batch, args, pad=0)
        results.append((stats, list(grads), sum(m is policy for m in passes), policy.state_dict()))
    (new, new_grads, new_passes, new_weights), (old, old_grads, old_passes, old_weights) = results
    assert new == old and list(new) == ["clip_fraction", "kl", "entropy"]
    assert all(type(v) is float for v in new.values())   # read from the device, as numbers
    assert len(new_grads) == len(old_grads) == inner_steps
    assert all(torch.equal(a, b) for g, g0 in zip(new_grads, old_grads) for a, b in zip(g, g0))
    assert all(torch.equal(new_weights[k], old_weights[k]) for k in new_weights)
    assert (new_passes, old_passes) == (3 * inner_steps, 3 * inner_steps + 3)   # 6 replies, chunks of 2
    assert (new["clip_fraction"] > 0) == (inner_steps > 1) and (new["kl"] > 0) == (beta > 0)


@pytest.fixture(scope="module")
def world():
    return P.make_world(60, 5)


def test_evaluation_problems_are_distinct_and_never_trained_on(world):
    problems = R.make_eval_problems(world, R.FAMILIES, 6, seed=3)
    keys = {p["key"] for p in problems}
    assert len(keys) == len(problems)
    assert {(p["family"], p["held_template"]) for p in problems} == {(f, h) for f in R.FAMILIES for h in (0, 1)}
    stream = R.training_problems(world, R.FAMILIES, keys, seed=3)
    for _ in range(500):
        p = next(stream)
        assert p["key"] not in keys and not p["held_template"]
        assert "order is" not in p["question"] and "Reach the number" not in p["question"]   # held-out wording
    rng = random.Random(0)
    assert {R.pick_template("abcd", rng, False) for _ in range(200)} == set("abc")
    assert R.make_eval_problems(world, R.FAMILIES, 6, seed=3) == problems   # seeded


def held_out_content(problem):
    """The reserved content a problem asks about: its products (sorted pairs), its person, or its set."""
    kind, rest = problem["key"].split(":", 1)
    if kind == "arithmetic":
        return {("product", tuple(sorted(q))) for q in ast.literal_eval(rest.split(":")[1])}
    return {(kind, rest)}


def test_validation_and_test_halves_share_no_held_out_content(world):
    """Each half asks every family about reserved content of its own: no product, person or Countdown set
    in both. Products split 7 and 7; a half's problems are all reserved; no split gives both halves."""
    halves = {split: R.make_eval_problems(world, R.FAMILIES, 6, seed=3, split=split) for split in R.EVAL_SPLITS}
    content = {split: set().union(*map(held_out_content, ps)) for split, ps in halves.items()}
    assert not content["validation"] & content["test"]
    for split, problems in halves.items():
        assert {p["family"] for p in problems} == set(R.FAMILIES)
        for p in problems:
            for kind, c in held_out_content(p):
                if kind == "product":
                    assert R.reserved_product(*c)
                elif kind == "multihop":
                    assert next(q for q in world["people"] if q["name"] == c)["qa_split"] == "heldout"
                else:
                    numbers, target = c.rsplit(":", 1)
                    assert R.countdown_reserved(ast.literal_eval(numbers), int(target))
    keep = R.eval_half(world, "validation")
    products = {tuple(sorted(q)) for q in R.purchases(True)}
    assert sum(keep("product", q) for q in products) == 7 and len(products) == 14
    assert R.eval_half(world, None) is None
    both = set().union(*map(held_out_content, R.make_eval_problems(world, R.FAMILIES, 6, seed=3)))
    assert both & content["validation"] and both & content["test"]


def test_eval_split_reaches_the_problems(monkeypatch, tmp_path):
    """--eval_split is the half make_eval_problems draws from (default test)."""
    import types
    seen = []
    enc = types.SimpleNamespace(encode_single_token=lambda token: 0)
    monkeypatch.setattr(R, "load_stage04", lambda init, device: (None, enc, {}, [], {}, 8))

    def problems(world, families, n, seed, split=None):
        seen.append(split)
        raise SystemExit(0)
    monkeypatch.setattr(R, "make_eval_problems", problems)
    for extra in (["--eval_split", "validation"], []):
        with pytest.raises(SystemExit):
            R.main(["--preset", "tiny", "--init", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *extra])
    assert seen == ["validation", "test"]


def test_countdown_targets_are_reachable(world):
    rng = random.Random(0)
    import itertools
    for _ in range(30):
        p = R.make_problem(world, "countdown", 3, rng, False)
        a, b, c = p["numbers"]
        found = any(R.countdown_value(f"({x} {o1} {y}) {o2} {z}", p["numbers"]) == p["answer"]
                    for x, y, z in itertools.permutations((a, b, c)) for o1 in "+-*" for o2 in "+-*")
        assert found and p["answer"] not in p["numbers"]


def test_harmlessness_after_rl_is_read_on_the_half_stage_04_scored(tiny_dpo):
    """Stage 04 reports "before" on one half of stage 03's held-out requests; "after RL" must be read on
    the same requests, not on both halves."""
    init, _ = tiny_dpo
    stage04 = json.loads((init / "metrics.json").read_text())
    _, _, _, items, before, _ = R.load_stage04(init, "cpu")
    assert stage04["eval_split"] == "test" and {R.request_half(it["request"]) for it in items} == {"test"}
    assert len(items) == before["all"]["n"]


def test_tiny_runs_of_every_variant(tiny_dpo, tmp_path):
    init, _ = tiny_dpo
    for variant in ("grpo", "dapo", "expert_iteration"):
        out = tmp_path / variant
        result = run_script("05_grpo_reasoning.py", "--preset", "tiny", "--init", init, "--out", out,
                            "--variant", variant)
        assert result.returncode == 0, result.stderr[-3000:]
        for name in ("model.pt", "metrics.json", "grpo.png", "report.md", "tokenizer.json", "world.json",
                     "eval_items.jsonl", "rehearsal.jsonl"):
            assert (out / name).exists(), name
        # stage 03's training requests, passed on for stage 06 to rehearse
        assert (out / "preferences.jsonl").read_bytes() == (init / "preferences.jsonl").read_bytes()
        m = json.loads((out / "metrics.json").read_text())
        assert m["history"] and m["history"][-1]["sampled_tokens"] >= m["args"]["sampled_tokens"]
        lines = [json.loads(line) for line in (out / "rehearsal.jsonl").read_text().splitlines()]
        assert len(lines) == sum(m["rehearsal"].values()) <= m["args"]["rehearsal"]
        for line in lines:   # only replies the checker accepted, right and well formed, are kept
            said = line["messages"][-1]
            assert R.reward(line["problem"], reply(said["content"], said["thinking"]), 0.1)["total"] == 1.1
            assert R.reserved_products(json.dumps(line)) == []   # none of evaluation's content is replayed
            assert line["problem"]["family"] != "countdown" or not R.countdown_reserved(
                line["problem"]["numbers"], line["problem"]["answer"])
        assert set(m["after"]) >= {"all", "arithmetic/1", "countdown/new template"} and m["harmlessness"]["rl"]
        assert torch.load(out / "model.pt", weights_only=True)["stage"] == "05_grpo_reasoning"


def test_a_variant_added_to_the_table_trains_with_its_advantages(tiny_dpo, tmp_path, monkeypatch):
    """RLOO (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs"): each reply's baseline is the mean of the other G - 1 rewards of its
    group. One entry in section 2's table makes it a --variant whose advantages the updates use."""
    def rloo(rewards):
        others = (rewards.sum(1, keepdim=True) - rewards) / (rewards.size(1) - 1)
        return rewards - others

    used = []

    def spy(rewards):   # what the updates were given
        used.append(rloo(rewards))
        return used[-1]

    monkeypatch.setitem(R.VARIANTS, "rloo", dict(advantages=spy, aggregate="sequence"))
    args = types.SimpleNamespace(variant="rloo", clip_low=0.2)
    # rewards 1, 0, 0, 1: a right reply's baseline is 1/3 (one right of the other three), a wrong one's 2/3
    torch.testing.assert_close(R.advantages_for(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), args),
                               torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    group = [{"correct": 1.0}, {"correct": 1.0}]
    assert R.clip_high_for(args) == 0.2 and R.keeps_group(group, args) and not R.fine_tunes_on_accepted(args)
    used.clear()
    out = tmp_path / "rloo"
    R.main(["--preset", "tiny", "--init", str(tiny_dpo[0]), "--out", str(out), "--variant", "rloo",
            "--device", "cpu"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["args"]["variant"] == "rloo" and len(used) == len(m["history"]) > 0   # one batch a step
    assert all(a.shape == (4, 4) for a in used)   # tiny: 4 problems x 4 replies


def test_bad_input_is_one_sentence(tiny_cai, tmp_path):
    init, _ = tiny_cai
    result = run_script("05_grpo_reasoning.py", "--preset", "tiny", "--init", init, "--out", tmp_path / "out")
    assert result.returncode == 1 and "run 04_dpo.py first" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    bad = run_script("05_grpo_reasoning.py", "--preset", "tiny", "--group_size", "1")
    assert bad.returncode == 2 and "--group_size must be at least 2" in bad.stderr


def test_the_kl_term_is_a_penalty_toward_the_reference():
    """With zero advantages only beta * k3 is left: the loss is +beta * mean k3, and a step pulls the
    policy's log-probabilities toward the reference's."""
    args = types.SimpleNamespace(variant="dapo", clip_low=0.2, clip_high=0.28, beta=0.5, max_new_tokens=2)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0]])
    loss, _, kl = R.rl_loss(logp, logp.detach(), ref, torch.ones(1, 2), torch.zeros(1), args)
    assert loss.item() == pytest.approx(0.5 * R.k3(logp, ref).mean().item()) and loss.item() > 0
    loss.backward()
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0   # descent lowers -1 toward -2, raises -2 toward -1


def test_keys_hold_content_not_wording(world):
    """The same numbers bought by another person are one arithmetic key; every relation question about
    a person has that person's key, whatever the chain, so training never asks about an evaluated one."""
    same_numbers = R._arithmetic(world, 2, random.Random(3), False)
    other_person = R._arithmetic({**world, "people": world["people"][::-1]}, 2, random.Random(3), False)
    assert same_numbers["question"] != other_person["question"] and same_numbers["key"] == other_person["key"]
    rng = random.Random(1)
    for _ in range(200):
        p = R.make_problem(world, "multihop", rng.choice((1, 2)), rng, False)
        if p:
            name = p["key"].split(":", 1)[1]
            assert p["key"] == f"multihop:{name}" and name in p["question"]


def test_rehearsal_lines_render_back_to_the_accepted_reply(world):
    enc = P.make_encoding("test", P.train_bpe([P.document(world, i, 4) for i in range(60)], 400))
    problem = {"family": "arithmetic", "difficulty": 1, "question": "Ada buys 3 cups at 4 coins each. How "
               "many coins does she pay?", "answer": 12}
    reply = enc.encode("<|think|>3 * 4 = 12<|/think|>Answer: 12<|end|>", allowed_special="all")
    record = {"problem": problem, "prompt": R.problem_prompt(enc, problem), "reply": reply}
    line = json.loads(R.rehearsal_lines(enc, [record]))
    ids, trained = R.render_conversation(enc, line["messages"])
    assert line["problem"] == problem
    assert ids == record["prompt"] + reply   # the same tokens the policy sampled after the same prompt
    assert [t for t, flag in zip(ids, trained) if flag] == reply   # and the reply is what a replay trains on


D = load_stage("02_sft")


def training_texts(world):
    """Every text stage 02 trains on (4,000 conversations) and 3,000 of stage 05's training problems."""
    texts = [json.dumps(c["messages"]) for c in D.sft_conversations(world, 0, 4000, "train")]
    ctx, rng = D._Context(world, "train"), random.Random(0)
    texts += [D._direct_expression(ctx, rng) for _ in range(3000)]   # the calculator's bare sums, rarer
    stream = R.training_problems(world, R.FAMILIES, set(), seed=0)
    return texts, [next(stream) for _ in range(3000)]


@pytest.mark.parametrize("n_people", [12, 200])   # the tiny world and the default (CPU) one
def test_no_training_text_of_stage_02_or_05_holds_reserved_content(n_people):
    """Held out by content: a product kept for evaluation (3 x 12) is written in no training text, in
    any kind or number of purchases, step, calculator sum or Countdown set; nor is a person of the
    world's "heldout" half asked about, or a reserved Countdown set given."""
    world = P.make_world(n_people, 1337)
    held = {p["name"]: p for p in world["people"] if p["qa_split"] == "heldout"}
    sft, problems = training_texts(world)
    assert R.reserved_product(3, 12) and R.reserved_product(12, 3) and not R.reserved_product(3, 11)
    assert [t for t in sft if R.reserved_products(t)] == []
    # "X walks", "X's guild"; not "either X or Y", a hedged answer naming X as an object
    subject = re.compile("(" + "|".join(map(re.escape, held)) + ")('s)? (?!or )[a-z]")
    assert [t for t in sft if subject.search(t)] == []   # a held-out person is named only as an object
    assert {p["family"] for p in problems} == set(R.FAMILIES)
    for p in problems:
        assert R.reserved_products(p["question"]) == [], p["question"]
        assert p["family"] != "multihop" or p["key"].split(":", 1)[1] not in held
        if p["family"] == "countdown":
            x = p["numbers"]
            assert not R.countdown_reserved(x, p["answer"])
            assert not any(R.reserved_product(a, b) for i, a in enumerate(x) for b in x[i + 1:])


@pytest.mark.parametrize("n_people", [12, 200])
def test_every_evaluation_problem_is_reserved_content(n_people):
    world = P.make_world(n_people, 1337)
    held = {p["name"] for p in world["people"] if p["qa_split"] == "heldout"}
    problems = R.make_eval_problems(world, R.FAMILIES, 30, seed=0)
    assert {p["family"] for p in problems} == set(R.FAMILIES)
    for p in problems:
        if p["family"] == "arithmetic":
            bought = R.PURCHASE.findall(p["question"])
            assert len(bought) == p["difficulty"] and all(R.reserved_product(a, b) for a, b in bought)
        elif p["family"] == "multihop":
            assert p["key"].split(":", 1)[1] in held
        else:
            assert R.countdown_reserved(p["numbers"], p["answer"])


def test_rehearsal_keeps_no_reply_that_works_out_a_reserved_product(monkeypatch):
    """Even a reply the checker accepts is not kept for stage 06 to replay if it writes out a product
    kept for evaluation (a Countdown reply can reach 3 * 12 from 1 + 2 = 3)."""
    def record(thinking):
        return {"reply": f"{thinking}|Answer: 41", "correct": True, "format": True, "total": 1.1,
                "shaped": 1.1, "thinking_tokens": 3, "truncated": False, "problem": {}}
    sampled = [record("1 + 2 = 3\n3 * 12 = 36\n36 + 5 = 41"), record("5 * 7 = 35\n35 + 6 = 41")]
    monkeypatch.setattr(R, "collect", lambda *a: (sampled, [], 0.0))
    enc = types.SimpleNamespace(decode=lambda ids: ids)
    args = types.SimpleNamespace(lr=1e-3, sampled_tokens=1, rehearsal=8, variant="grpo", group_size=2)
    _, accepted = R.train(torch.nn.Linear(1, 1), None, enc, None, 0, args)
    assert accepted == [sampled[1]]


def test_no_pretraining_page_writes_a_reserved_product():
    """Held out at every boundary: stage 01's worked-arithmetic pages skip the products stage 05
    evaluates on, so its held-out one-purchase problems were not read in pretraining either."""
    world = P.make_world(200, 1337)
    pages = [text for _, text, _ in (P._write(world, i, 1337) for i in range(3000)) if "Answer:" in text]
    assert len(pages) > 50
    assert [page for page in pages if R.reserved_products(page)] == []


# --- stage 02's cold start: multi-hop and Countdown demonstrations for this stage ------------------

COLD = ("multihop_think", "countdown_think")


def cold_start(world, split, n=150):
    """Stage 02's cold-start demonstrations on one side of its split, as (messages, meta)."""
    ctx, rng = D._Context(world, split), random.Random(0)
    drawn = (D._generate(ctx, rng, task) for _ in range(n) for task in COLD)
    return [(messages, meta) for messages, meta, _ in filter(None, drawn)]


def as_problem(world, question, templates=None):
    """This stage's problem for a question, read back through its own templates (default: the training
    ones) and answer keys; None when none of those templates writes the question."""
    index = {"town": {t["name"]: t for t in world["towns"]},
             "org": {o["name"]: o for o in world["organisations"]}}
    people = {p["name"]: p for p in world["people"]}
    for chain, (_, answer_of, chain_templates) in R.MULTIHOP.items():
        for template in templates or chain_templates[:-1]:
            found = re.fullmatch(re.escape(template).replace(re.escape("{s}"), "(.+)"), question)
            if found and found[1] in people:
                return {"family": "multihop", "question": question, "answer": answer_of(index, people[found[1]])}
    for template in templates or R.COUNTDOWN_TEMPLATES[:-1]:
        pattern = re.escape(template).replace(re.escape("{target}"), r"(?P<target>\d+)")
        pattern = pattern.replace(re.escape("{numbers}"), r"(?P<numbers>\d+(?:, \d+)* and \d+)")
        if found := re.fullmatch(pattern, question):
            return {"family": "countdown", "question": question, "answer": int(found["target"]),
                    "numbers": [int(x) for x in re.findall(r"\d+", found["numbers"])]}
    return None


@pytest.mark.parametrize("n_people", [12, 200])
def test_every_cold_start_demonstration_earns_this_stages_full_reward(n_people):
    """Stage 02's multi-hop and Countdown demonstrations (training and its eval references) are asked
    with this stage's exact prompt tokens, and their replies, parsed as this stage parses a sample, get
    the checker's full reward: right, and in the rewarded form."""
    world = P.make_world(n_people, 1337)
    enc = P.make_encoding("test", P.train_bpe([P.document(world, i, 4) for i in range(60)], 400))
    for split in ("train", "eval"):
        demos = cold_start(world, split)
        families = {meta["family"] for _, meta in demos}   # the tiny world may have no multi-hop eval person
        assert families == {"multihop", "countdown"} or (n_people == 12 and families == {"countdown"})
        for messages, meta in demos:
            problem = as_problem(world, messages[1]["content"])
            assert problem is not None and problem["family"] == meta["family"], messages
            ids, _ = D.render_conversation(enc, messages)
            prompt = R.problem_prompt(enc, problem)
            assert ids[:len(prompt)] == prompt, messages   # stage 05's system prompt and question, verbatim
            reward = R.reward(problem, R.parse_reply(enc, ids[len(prompt):]), 0.1)
            assert reward == {"correct": 1.0, "format": 1.0, "total": 1.1}, messages


@pytest.mark.parametrize("n_people", [12, 200])
def test_no_cold_start_demonstration_holds_this_stages_evaluation_content(n_people):
    """Held out by content: no demonstration (nor stage 02's eval item) names a person of the world's
    "heldout" half, gives a reserved Countdown set or one with a reserved pair, writes a reserved product
    (negative steps included), or is asked in a family's held-out template."""
    world = P.make_world(n_people, 1337)
    held = {p["name"] for p in world["people"] if p["qa_split"] == "heldout"}
    held_templates = [spec[2][-1] for spec in R.MULTIHOP.values()] + R.COUNTDOWN_TEMPLATES[-1:]
    eval_keys = {p["key"] for p in R.make_eval_problems(world, R.FAMILIES, 30, seed=0)}
    for split in ("train", "eval"):
        demos = cold_start(world, split)
        assert len(demos) >= 150
        for messages, meta in demos:
            text, question = json.dumps(messages), messages[1]["content"]
            assert R.reserved_products(text.replace("-", "")) == [], text
            assert as_problem(world, question, held_templates) is None, question
            assert not any(name in text for name in held), text
            problem = as_problem(world, question)
            if meta["family"] == "countdown":
                assert R.countdown_trainable(problem["numbers"], problem["answer"]), question
                assert f"countdown:{sorted(problem['numbers'])}:{problem['answer']}" not in eval_keys
            else:
                assert f"multihop:{meta['subject']}" not in eval_keys
