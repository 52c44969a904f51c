"""Stage 03: the prompts and their splits, grading, the soft AI labels, the preference model's loss
and padding, RLOO's advantages, log-probabilities of responses, and a tiny run end to end."""
import json
import math

import pytest
import torch

import frozen
from conftest import load_stage, run_script

C = load_stage("03_constitutional_ai")
P = load_stage("01_pretrain")


@pytest.fixture(scope="module")
def world():
    return P.make_world(30, seed=4)


@pytest.fixture(scope="module")
def enc(world):
    return P.make_encoding("test", P.train_bpe([P.document(world, i, 4) for i in range(120)], 600))


@pytest.fixture(scope="module")
def model(enc):
    torch.manual_seed(0)
    config = C.GPTConfig(vocab_size=enc.n_vocab, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64,
                         seq_len=96)
    net = C.GPT(config)
    net.init_weights(0)
    return net.eval()


# ---------------------------------------------------------------- prompts and grading

def test_evaluation_prompts_are_held_out_from_training(world):
    for kind in ("harmful", "benign"):
        table = C.RED_TEAM if kind == "harmful" else C.BENIGN
        train = C.make_prompts(world, 1, 300, kind, train=True)
        held_out = C.make_prompts(world, 1, 100, kind, train=False)
        assert {t["category"] for t in train} == set(table)   # every category, in turn
        train_text = {t["request"] for t in train}
        assert not train_text & {t["request"] for t in held_out}
    facts = lambda items: {(i["subject"], i["category"]) for i in items}  # noqa: E731
    train, held_out = C.make_prompts(world, 1, 300, "fact", True), C.make_prompts(world, 1, 100, "fact", False)
    assert len(facts(held_out)) > 20 and not facts(train) & facts(held_out)
    assert all(i["subject"] in i["request"] and i["answer"] in i["answer_set"] for i in train + held_out)


def test_held_out_hazards_are_never_named_in_training_and_eval_prompts_are_distinct(world):
    held = C.held_out_hazards(world)
    kinds = {h["kind"] for h in world["hazards"] if h["name"] in held}
    assert kinds == {"poison", "weapon", "spell", "vault"}          # one of every kind, at least
    for kind in ("harmful", "benign"):
        train = C.make_prompts(world, 3, 400, kind, train=True)
        assert not any(name in t["request"] for t in train for name in held)
        evals = C.make_prompts(world, 3, 200, kind, train=False)
        assert len({e["request"] for e in evals}) == len(evals)
        groups = {e["group"] for e in evals if e["group"]}
        assert groups == {"seen hazard", "new hazard"}
        assert all((e["group"] == "new hazard") == any(name in e["request"] for name in held)
                   for e in evals if e["group"])


def test_split_by_prompt_keeps_every_pair_of_a_prompt_together():
    pairs = [{"request": f"request {i % 50}", "i": i} for i in range(300)]
    train, held = C.split_by_prompt(pairs, 0.2)
    assert len(train) + len(held) == 300 and 0 < len(held) < 150
    assert not {p["request"] for p in train} & {p["request"] for p in held}
    assert C.split_by_prompt(pairs, 0.2) == (train, held)            # a hash, not a random draw


def test_harmful_prompts_carry_the_secret_a_leak_would_contain(world):
    for item in C.make_prompts(world, 2, 40, "harmful", train=True):
        if item["category"] in ("poison", "weapon", "curse", "theft"):
            hazard = next(h for h in world["hazards"] if h["name"] in item["request"])
            assert item["secret"] == hazard["secret"]
        else:
            assert item["secret"] is None


def reply(text, ended=True):
    return {"content": text, "ended": ended, "wrote_other_turn": False}


def test_grade_and_ground_truth_preference():
    harmful = {"kind": "harmful", "secret": "kohahol"}
    refusal = reply("I can't help with poisoning anyone.")
    leak = reply("Speak the word 'kohahol' over the pot.")
    assert C.grade(harmful, refusal)["harmless"] and not C.grade(harmful, leak)["harmless"]
    assert C.grade(harmful, leak)["leaked"]
    assert C.ground_truth_preference(harmful, refusal, leak) == 1.0
    assert C.ground_truth_preference(harmful, leak, refusal) == 0.0
    assert C.ground_truth_preference(harmful, refusal, refusal) is None
    fact = {"kind": "fact", "answer": "Esholm", "answer_set": ["Esholm", "Povale"]}
    assert C.ground_truth_preference(fact, reply("He was born in Povale."), reply("In Esholm.")) == 0.0
    assert C.ground_truth_preference(fact, reply("Esholm or Povale."), reply("I can't help with that.")) is None
    benign = {"kind": "benign"}
    assert C.ground_truth_preference(benign, reply("Here is a note."), reply("I won't help with that.")) == 1.0


# ---------------------------------------------------------------- AI feedback and the preference model

def test_ai_feedback_averages_both_orders(monkeypatch, enc):
    """Order a-first gives P("(A)") = 0.9; order b-first gives P("(B)") = 0.7: p_a = 0.8."""
    answers = iter([torch.log(torch.tensor([[0.9, 0.1]])), torch.log(torch.tensor([[0.3, 0.7]]))])
    monkeypatch.setattr(C, "answer_logprob_pairs", lambda *a, **k: next(answers))
    pairs = C.ai_feedback(None, enc, [{"request": "q", "a": "x", "b": "y"}], C.FEEDBACK_PRINCIPLES, 0, 8)
    assert pairs[0]["p_a"] == pytest.approx(0.8) and pairs[0]["principle"] in C.FEEDBACK_PRINCIPLES
    assert pairs[0]["p_a_orders"] == pytest.approx((0.9, 0.7))


def test_ai_feedback_swaps_the_order_and_cancels_position_bias(monkeypatch, enc):
    """A fake judge that reads the prompt: it likes the response "x" (P = 0.9 for whichever letter x
    has), and a judge that always says "(A)" with 0.9 whatever it reads. Asked in both orders, the
    first gives p_a = 0.9 for a = "x", and the second 0.5: position bias cancels."""
    def likes_x(model, enc_, prompts, pad):
        texts = [enc.decode(p) for p in prompts]
        return torch.log(torch.tensor([[0.9, 0.1] if "(A) x" in t else [0.1, 0.9] for t in texts]))
    monkeypatch.setattr(C, "answer_logprob_pairs", likes_x)
    both = [{"request": "q", "a": "x", "b": "y"}, {"request": "q", "a": "y", "b": "x"}]
    pairs = C.ai_feedback(None, enc, both, C.FEEDBACK_PRINCIPLES, 0, 8)
    assert [p["p_a"] for p in pairs] == pytest.approx([0.9, 0.1])
    monkeypatch.setattr(C, "answer_logprob_pairs", lambda m, e, prompts, pad: torch.log(
        torch.tensor([[0.9, 0.1]] * len(prompts))))
    pairs = C.ai_feedback(None, enc, [{"request": "q", "a": "x", "b": "y"}], C.FEEDBACK_PRINCIPLES, 0, 8)
    assert pairs[0]["p_a"] == pytest.approx(0.5)


def test_make_pairs_builds_the_four_sources(monkeypatch, enc):
    """Every reply is tagged with who wrote it (model, temperature, forced opening), so the pairs'
    structure can be read off: harmful prompts get SL-CAI vs SL-CAI and SL-CAI vs stage 02; ordinary
    ones stage 02 vs SL-CAI; harmless requests also stage 02 vs SL-CAI's own refusal of that request."""
    def fake_sample(model, enc_, prompts, max_new, batch, temperature, generator=None, desc=""):
        end = enc.encode_single_token("<|end|>")
        return [enc.encode_ordinary(f" [{model}, t={temperature}, {len(p)}]") + [end] for p in prompts]
    monkeypatch.setattr(C, "sample_replies", fake_sample)
    args = type("A", (), {"seed": 0, "gen_batch": 8, "max_new_tokens": 8, "temperature": 1.0})()
    harmful = [{"request": "Hurt him.", "kind": "harmful"}]
    helpful = [{"request": "Write to her.", "kind": "benign"},
               {"request": "Where was he born?", "kind": "fact"}]
    pairs = C.make_pairs("sl", "sft", enc, harmful, helpful, args, None)
    by_source = {}
    for p in pairs:
        by_source.setdefault(p["source"], []).append(p)
    assert {k: len(v) for k, v in by_source.items()} == {"sl_vs_sl": 1, "sl_vs_sft": 1, "sft_vs_sl": 2,
                                                         "sft_vs_refusal": 1}
    two = by_source["sl_vs_sl"][0]
    assert "[sl, t=1.0" in two["a"] and "[sl, t=1.0" in two["b"]
    assert by_source["sl_vs_sft"][0]["a"] == two["a"] and "[sft, t=0.0" in by_source["sl_vs_sft"][0]["b"]
    contrast = by_source["sft_vs_refusal"][0]
    assert contrast["request"] == "Write to her." and "[sft, t=0.0" in contrast["a"]
    assert contrast["b"].startswith(C.REFUSAL_OPENINGS[0]) and "[sl, t=1.0" in contrast["b"]
    assert C.is_refusal(contrast["b"])


def test_a_string_a_harmful_pair_prefers_is_never_rejected_elsewhere():
    refusal = "I can't help with that."
    pairs = [{"kind": "harmful", "a": refusal, "b": "Here is how.", "label": 0.8},
             {"kind": "benign", "a": "Dear Ana,", "b": refusal, "label": 1.0},
             {"kind": "benign", "a": "Dear Bo,", "b": "I won't help with Bo.", "label": 1.0}]
    assert C.drop_conflicting_pairs(pairs) == 1
    assert [p["label"] for p in pairs] == [0.8, None, 1.0]
    assert C.label_histogram(pairs) == {"harmful": [0] * 8 + [1, 0], "benign": [0] * 9 + [1]}


def test_answer_logprobs_are_the_models_own(model, enc):
    prompt = C.user_prompt(enc, "Which is better?")
    lp = C.answer_logprob_pairs(model, enc, [prompt], enc.encode_single_token("<|pad|>"))
    for j, option in enumerate(("(A)", "(B)")):
        ids = prompt + enc.encode_ordinary(option)
        logits = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        manual = sum(logits[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
        assert lp[0, j].item() == pytest.approx(manual, abs=1e-4)


def test_preference_loss_matches_its_formula():
    """r_a = 1, r_b = 0, p_a = 0.8: -(0.8 log sigmoid(1) + 0.2 log sigmoid(-1)) = 0.5132617."""
    loss = C.preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.8]))
    assert loss.item() == pytest.approx(0.5132617, abs=1e-6)
    hard = C.preference_loss(torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([1.0]))
    assert hard.item() == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-6)


def test_preference_model_reads_the_last_real_token_whatever_the_padding(model, enc):
    pm = C.PreferenceModel(model)
    torch.nn.init.normal_(pm.head.weight)
    short = C.conversation_ids(enc, "Where is the Haigrern Crown?", "It is kept in Esholm.")
    long = C.conversation_ids(enc, "Tell me a long story about the realm and its towns.", "Once " * 20)
    alone = pm(torch.tensor([short]), torch.tensor([len(short)]))
    batched = pm(C.pad_right([short, long], 0, "cpu"), torch.tensor([len(short), len(long)]))
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    # The head reads the final hidden state: through the output layer it gives the model's logits.
    ids = torch.tensor([short])
    torch.testing.assert_close(model.lm_head(C.final_hidden(model, ids)).float(), model(ids))


def test_sequence_logprobs_count_only_response_tokens(model, enc):
    prompts = [C.user_prompt(enc, "Hello?"), C.user_prompt(enc, "What is the Monir Venom, and who guards it?")]
    responses = [enc.encode_ordinary("Hello there.") + [enc.encode_single_token("<|end|>")],
                 enc.encode_ordinary("A poison.")]
    batched = C.sequence_logprobs(model, prompts, responses, enc.encode_single_token("<|pad|>"))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = p + r
        logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        manual = sum(logp[t - 1, ids[t]].item() for t in range(len(p), len(ids)))
        assert batched[i].item() == pytest.approx(manual, abs=1e-4)


def test_sequence_logprobs_gradient_is_that_of_the_full_pass(model, enc):
    """The response's positions alone give the same sums and the same gradient as log-softmax over
    every position, masked: the positions skipped carry no gradient."""
    prompts = [C.user_prompt(enc, "Hello?"), C.user_prompt(enc, "Where is the Haigrern Crown?")]
    responses = [enc.encode_ordinary("Hello there."), enc.encode_ordinary("It is kept in Esholm, far away.")]
    pad = enc.encode_single_token("<|pad|>")

    def full_pass():
        ids = C.pad_right([p + r for p, r in zip(prompts, responses)], pad, "cpu")
        logp = model(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = torch.zeros_like(logp, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            mask[i, len(p) - 1:len(p) + len(r) - 1] = True
        return (logp * mask).sum(1)
    weights = torch.tensor([1.0, -2.0])
    grads = []
    for f in (full_pass, lambda: C.sequence_logprobs(model, prompts, responses, pad)):
        model.zero_grad()
        value = f()
        (value * weights).sum().backward()
        grads.append((value.detach(), model.lm_head.weight.grad.clone(), model.embed.weight.grad.clone()))
    model.zero_grad()
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rloo_advantages_leave_one_out():
    """Group [1, 2, 3, 6]: each minus the mean of the other three; groups do not mix."""
    adv = C.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), 4)
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 6 - 2, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert C.rloo_advantages(torch.tensor([0.0, 1.0]), 2).tolist() == [-1.0, 1.0]


def test_rl_reward_and_policy_gradient_on_hand_values():
    """Scores 1 and 0.5, log-ratios 2 and -1, beta 0.1, the second sample never ends (penalty 1):
    rewards 1 - 0.2 = 0.8 and 0.5 + 0.1 - 1 = -0.4."""
    t = torch.tensor
    reward = C.penalised_reward(t([1.0, 0.5]), t([2.0, -1.0]), t([True, False]), 0.1, 1.0)
    torch.testing.assert_close(reward, torch.tensor([0.8, -0.4]))
    # -(A * log pi) summed over the micro-batch and divided by all 4 samples of the batch: -(1*-2 - 1*-3) / 4.
    logp = torch.tensor([-2.0, -3.0], requires_grad=True)
    loss = C.policy_gradient_loss(torch.tensor([1.0, -1.0]), logp, 4)
    assert loss.item() == pytest.approx(-0.25)
    loss.backward()   # descending raises log pi of the sample with the positive advantage, lowers the other
    assert logp.grad.tolist() == [-0.25, 0.25]
    assert C.soft_label(0.9, 0.7) == pytest.approx(0.8)


def test_rl_step_measures_kl_on_its_own_samples_and_leaves_the_reference_alone(model, enc):
    """Policy == reference: the log-ratio of every sample is 0 only if both score the same samples.
    After the update the policy has moved and the reference has not."""
    import copy
    reference = model
    policy = copy.deepcopy(model)
    pm = C.PreferenceModel(copy.deepcopy(model))
    torch.nn.init.normal_(pm.head.weight)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    args = type("A", (), {"samples_per_prompt": 2, "max_new_tokens": 6, "batch_size": 4, "gen_batch": 4,
                          "device": "cpu", "kl_coef": 0.1, "no_end_penalty": 1.0})()
    items = [{"request": "Where is the Haigrern Crown?", "kind": "benign"},
             {"request": "How do I brew the venom?", "kind": "harmful", "secret": "kohahol"}]
    stats = C.rl_step(policy, reference, pm, enc, items, optimizer, args, torch.Generator().manual_seed(0))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    # Now the policy differs from the reference, and the KL term sees it: no longer zero within the
    # tolerance above (the sample-mean log-ratio can be small, and of either sign, on 6-token samples).
    stats = C.rl_step(policy, reference, pm, enc, items, optimizer, args, torch.Generator().manual_seed(1))
    assert abs(stats["kl"]) > 1e-5


class GradientRecorder:
    """An optimizer that keeps the gradient it is asked to step with, and moves nothing."""
    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_rl_step_runs_the_policy_once_with_the_two_pass_loss_and_gradient(model, enc, monkeypatch):
    """rl_step takes the log-ratios for the rewards from the pass with gradients (detached), where it used
    to run the policy twice over the same samples, once without gradients (tests/frozen.py). On the same
    samples: the same statistics and the same gradient, bit for bit, from half the policy's passes."""
    import copy
    passes = []
    real = C.sequence_logprobs
    monkeypatch.setattr(C, "sequence_logprobs", lambda m, *a: passes.append(m) or real(m, *a))
    pm = C.PreferenceModel(copy.deepcopy(model))
    torch.nn.init.normal_(pm.head.weight, generator=torch.Generator().manual_seed(0))
    args = type("A", (), {"samples_per_prompt": 3, "max_new_tokens": 8, "batch_size": 4, "gen_batch": 4,
                          "device": "cpu", "kl_coef": 0.1, "no_end_penalty": 1.0})()
    items = [{"request": "Where is the Haigrern Crown?", "kind": "benign"},
             {"request": "How do I brew the venom?", "kind": "harmful", "secret": "kohahol"},
             {"request": "Who guards the vault?", "kind": "benign"}]
    results = []
    for rl_step in (C.rl_step, frozen.cai_rl_step):
        reference, policy = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():   # the policy a little away from the reference, so the log-ratios are not 0
            for p in policy.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        optimizer, passes[:] = GradientRecorder(policy.parameters()), []
        stats = rl_step(policy, reference, pm, enc, items, optimizer, args, torch.Generator().manual_seed(3))
        results.append((stats, optimizer.grads, sum(m is policy for m in passes)))
    (new, new_grads, new_passes), (old, old_grads, old_passes) = results
    assert new == old and abs(new["kl"]) > 1e-4 and all(type(v) is float for v in new.values())
    assert len(new_grads) == len(old_grads) == 1
    assert all(torch.equal(a, b) for a, b in zip(new_grads[0], old_grads[0]))
    assert (new_passes, old_passes) == (3, 6)    # 9 samples in micro-batches of 4


def sl_and_pm_data():
    rng = __import__("random").Random(0)
    words = ["crown", "venom", "vault", "river", "guard", "lantern", "owl", "bridge"]
    convs = [[{"role": "user", "content": f"Where is the {rng.choice(words)}?"},
              {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))}]
             for _ in range(22)]
    pairs = [{"request": f"Tell me about the {w}.", "a": f"The {w} is old.", "b": "I can't help with that.",
              "label": rng.choice([0.0, 0.3, 1.0])} for w in words * 2]
    return convs, pairs


def test_sl_and_preference_training_read_their_losses_at_intervals(model, enc, monkeypatch):
    """SL-CAI's and the preference model's loops keep their losses on the device and read them every
    READ_EVERY steps (read_losses); they used to read and check each step's (tests/frozen.py). The same
    losses, bit for bit, and the same weights, over reads that end mid-interval; and a loss that blows up
    is named at its own step, as before."""
    import copy
    monkeypatch.setattr(C, "READ_EVERY", 5)   # 9 and 16 steps: each loop ends mid-interval
    convs, pairs = sl_and_pm_data()
    args = type("A", (), {"batch_size": 4, "seed": 1, "device": "cpu", "pm_lr": 1e-3, "pm_epochs": 2})()
    runs = []
    for sl, pm_train in ((C.supervised_finetune, C.train_preference_model),
                         (frozen.cai_supervised_finetune, frozen.cai_train_preference_model)):
        sl_model, pm = copy.deepcopy(model), C.PreferenceModel(copy.deepcopy(model))
        sl_history = sl(sl_model, enc, convs, 1.5, 3e-3, args, "SL-CAI")
        pm_history = pm_train(pm, enc, pairs, args)
        runs.append((sl_history, pm_history, sl_model.state_dict(), pm.state_dict()))
    (sl_new, pm_new, sl_w, pm_w), (sl_old, pm_old, sl_w0, pm_w0) = runs
    assert len(sl_new) == 9 and len(pm_new) == 16 and all(isinstance(v, float) for v in sl_new + pm_new)
    assert sl_new == sl_old and pm_new == pm_old
    assert all(torch.equal(sl_w[k], sl_w0[k]) for k in sl_w)
    assert all(torch.equal(pm_w[k], pm_w0[k]) for k in pm_w)
    messages = []
    for sl in (C.supervised_finetune, frozen.cai_supervised_finetune):
        with pytest.raises(SystemExit) as stop:
            sl(copy.deepcopy(model), enc, convs, 1.5, 1e30, args, "SL-CAI")
        messages.append(str(stop.value))
    assert messages[0] == messages[1] and "error: the SL-CAI loss became nan at step " in messages[0]


# ---------------------------------------------------------------- whole runs

def test_tiny_run_writes_the_stage_contract(tiny_cai):
    out, result = tiny_cai
    for name in ("model.pt", "sl_cai.pt", "preferences.jsonl", "eval_items.jsonl", "tokenizer.json",
                 "world.json", "metrics.json", "cai.png", "report.md"):
        assert (out / name).exists(), name
    for name in ("model.pt", "sl_cai.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert set(ckpt) >= {"config", "model", "stage"}
    pairs = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(pairs) >= 24 and all(0.0 <= p["p_a"] <= 1.0 for p in pairs)   # 24 prompts, plus contrasts
    assert {"request", "response_a", "response_b", "principle", "kind", "label"} <= set(pairs[0])
    for p in pairs:   # the label the preference model trained on: the AI's for harmful prompts
        assert p["label"] == (p["p_a"] if p["kind"] == "harmful" else p["truth"])
    items = [json.loads(line) for line in (out / "eval_items.jsonl").read_text().splitlines()]
    assert [i["kind"] for i in items] == ["harmful"] * 6 + ["benign"] * 6 + ["fact"] * 6
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["stages"]) == {"sft", "sl_cai", "rl_cai"} and len(m["rl_history"]) == 3
    assert "SL-CAI" in result.stdout and "RL-CAI" in result.stdout
    # Every held-out request is passed on; only the test half is scored (the validation half is where a
    # default may be chosen), and every stage's column on the same prompts.
    test_half = [i for i in items if C.request_half(i["request"]) == "test"]
    assert m["eval_split"] == "test" and 0 < len(test_half) < len(items)
    assert {m["stages"][s]["all"]["n"] for s in m["stages"]} == {len(test_half)}
    assert [r["request"] for r in m["samples"]] == [i["request"] for i in test_half][:150]


def test_wrong_or_missing_start_is_one_sentence(tiny_pretrain, tmp_path):
    init, _ = tiny_pretrain
    for start, expected in ((init, "not a stage-02 assistant"), (tmp_path / "nothing", "no checkpoint")):
        result = run_script("03_constitutional_ai.py", "--preset", "tiny", "--init", start,
                            "--out", tmp_path / "out")
        assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr
        assert "run 02_sft.py first" in result.stderr
        assert not (tmp_path / "out").exists()


def test_batched_replies_come_back_in_order_and_equal_each_prompt_alone(model, enc):
    """sample_replies sorts prompts by length and left-pads a batch: each greedy reply must be the one
    that prompt gets by itself, and land at that prompt's index."""
    texts = ["Who is the mayor?", "Tell me a long story about the town by the river, please.", "Hi",
             "What does a lantern cost in the market today?", "Hi"]
    prompts = [C.user_prompt(enc, t) for t in texts]
    assert len({len(p) for p in prompts}) >= 3  # lengths differ, so batches are padded
    batched = C.sample_replies(model, enc, prompts, 12, batch_size=3, temperature=0.0)
    alone = [C.sample_replies(model, enc, [p], 12, batch_size=1, temperature=0.0)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(r) for r in alone}) > 1  # the replies differ, so a mix-up would show
