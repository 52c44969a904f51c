"""Stage 04: the DPO and IPO losses on hand-computed values, SimPO added through section 2's table, the
pairs it reads, one step moving the policy the right way, and tiny runs end to end."""
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import load_stage, run_script

D = load_stage("04_dpo")
P = load_stage("01_pretrain")


def pair_logps(policy, reference, lengths=(1, 1)):
    """PairLogps of one pair from (chosen, rejected) tuples: the policy's and the reference's summed
    log-probabilities, and the two responses' token counts."""
    t = lambda x: torch.tensor([float(x)])  # noqa: E731
    return D.PairLogps(policy_chosen=t(policy[0]), policy_rejected=t(policy[1]),
                       reference_chosen=t(reference[0]), reference_rejected=t(reference[1]),
                       chosen_length=t(lengths[0]), rejected_length=t(lengths[1]))


def test_dpo_loss_matches_its_formula():
    """log pi(chosen) = -1, log pi(rejected) = -3, reference -2 and -2, beta 0.5: h = 0.5 * (1 - (-1))."""
    t = lambda x: torch.tensor([x])  # noqa: E731
    h = D.reference_margin(pair_logps((-1, -3), (-2, -2)), 0.5)
    assert h.item() == pytest.approx(1.0)
    assert D.implicit_reward(t(-1.0), t(-2.0), 0.5).item() == pytest.approx(0.5)
    assert D.dpo_loss(h, t(1.0), 0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    # A soft label weighs both orders: 0.7 * -log sigmoid(1) + 0.3 * -log sigmoid(-1).
    soft = 0.7 * math.log1p(math.exp(-1.0)) + 0.3 * math.log1p(math.exp(1.0))
    assert D.dpo_loss(h, t(0.7), 0.5).item() == pytest.approx(soft, abs=1e-6)
    # Swapping the two responses negates the margin.
    assert D.reference_margin(pair_logps((-3, -1), (-2, -2)), 0.5).item() == pytest.approx(-1.0)


def test_reference_margin_reads_no_lengths_and_tells_the_sides_apart():
    """Policy -1 and -3, reference -2 and -2.5, beta 0.5: h = 0.5 * ((-1 + 2) - (-3 + 2.5)) = 0.75,
    whatever the two responses' lengths (DPO and IPO sum log-ratios over tokens)."""
    for lengths in ((1, 1), (2, 5), (7, 3)):
        h = D.reference_margin(pair_logps((-1, -3), (-2, -2.5), lengths), 0.5)
        assert h.item() == pytest.approx(0.75)


def test_pair_objective_on_hand_values():
    """Policy -4 over 2 tokens and -9 over 3, reference -5 and -6, beta 0.5: h = 0.5 * (1 - (-3)) = 2;
    the next-token term is the chosen response's 4 / 2; the implicit rewards 0.5 and -1.5."""
    lp, certain = pair_logps((-4, -9), (-5, -6), (2, 3)), torch.tensor([1.0])
    args = types.SimpleNamespace(beta=0.5, loss="dpo", nll_coef=1.0)
    loss, stats = D.pair_objective(lp, certain, args)
    assert stats["margin"] == pytest.approx(2.0) and stats["nll"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)) + 2.0, abs=1e-6)
    assert stats["chosen_reward"] == pytest.approx(0.5) and stats["rejected_reward"] == pytest.approx(-1.5)
    assert stats["reward_accuracy"] == 1.0
    args.loss = "ipo"   # the table's other loss on the same h: (h / beta - 1 / (2 beta))^2 = (4 - 1)^2
    assert D.pair_objective(lp, certain, args)[0].item() == pytest.approx(9.0 + 2.0, rel=1e-6)


def test_orienting_a_pair_puts_the_preferred_response_first():
    assert D.orient("a", "b", 0.8) == ("a", "b", 0.8)
    chosen, rejected, confidence = D.orient("a", "b", 0.3)
    assert (chosen, rejected) == ("b", "a") and confidence == pytest.approx(0.7)
    assert D.orient("a", "b", 0.5) == ("a", "b", 0.5)          # undecided: order kept
    assert [D.hard_label(c) for c in (0.5, 0.51, 0.9, 1.0)] == [0.5, 1.0, 1.0, 1.0]


def test_next_token_term_and_statistics_on_hand_values():
    # Chosen log-probs -4 over 2 tokens and -9 over 3; only the first pair is decided: NLL = 4 / 2.
    nll = D.next_token_loss(torch.tensor([-4.0, -9.0]), torch.tensor([2.0, 3.0]), torch.tensor([True, False]))
    assert nll.item() == pytest.approx(2.0)
    stats = D.preference_statistics(torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.3, 0.1, 0.2]),
                                    torch.tensor([-0.7, 0.6, 0.0]), torch.tensor([True, True, False]))
    assert stats["reward_accuracy"] == pytest.approx(0.5)   # 1 of the 2 decided pairs ranked right
    assert stats["margin"] == pytest.approx(0.7 / 3)
    assert stats["chosen_reward"] == pytest.approx(0.2)
    assert stats["rejected_reward"] == pytest.approx(-0.1 / 3)


def test_a_loss_added_to_the_table_becomes_a_flag(monkeypatch):
    hinge = lambda h, c, beta: torch.relu(1 - h).mean()  # noqa: E731
    monkeypatch.setitem(D.LOSSES, "hinge", D.Objective(D.reference_margin, hinge))
    assert D.parse_args(["--loss", "hinge", "--device", "cpu"]).loss == "hinge"


def test_ipo_loss_matches_azar_et_al_on_hand_values():
    """IPO (Azar et al., arXiv 2310.12036, eq. 17) on one pair: (g - 1/(2 tau))^2, where g is the
    log-ratio gap without beta. log pi(chosen) = -1, log pi(rejected) = -3, references -2 and -2:
    g = 2. With tau = beta = 0.1 the target is 5, so the loss is (2 - 5)^2 = 9; our h is beta * g = 0.2."""
    t = lambda x: torch.tensor([x])  # noqa: E731
    h = D.reference_margin(pair_logps((-1, -3), (-2, -2)), 0.1)
    assert D.ipo_loss(h, t(1.0), 0.1).item() == pytest.approx(9.0, rel=1e-5)
    # A soft label c = 0.75 moves the target to (2c - 1) / (2 tau) = 2.5: (2 - 2.5)^2.
    assert D.ipo_loss(h, t(0.75), 0.1).item() == pytest.approx(0.25, rel=1e-4)
    # A certain pair is at rest when the log-ratio gap is 1/(2 beta) = 5, not 50.
    assert D.ipo_loss(t(0.5), t(1.0), 0.1).item() == pytest.approx(0.0, abs=1e-10)


def test_ipo_optimum_is_the_minimiser_over_both_orders():
    """Label c: the paper's loss on (chosen, rejected) with weight c plus on (rejected, chosen) with
    weight 1 - c, as a function of g, is smallest where ipo_loss is zero."""
    beta, c = 0.25, 0.8
    g = torch.linspace(-5, 5, 10001, dtype=torch.float64)
    both_orders = c * (g - 1 / (2 * beta)) ** 2 + (1 - c) * (-g - 1 / (2 * beta)) ** 2
    best = g[both_orders.argmin()].item()
    assert best == pytest.approx(1.2, abs=1e-3)   # (2c - 1) / (2 beta)
    at_best = D.ipo_loss(torch.tensor([beta * best]), torch.tensor([c]), beta)
    assert at_best.item() == pytest.approx(0.0, abs=1e-5)


# SimPO (Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward"),
# added to stage 04 as a fork would: one entry of section 2's table, its margin and its loss.
SIMPO_GAMMA = 0.5   # the target reward margin


def simpo_margin(lp, beta):
    """The difference of SimPO's rewards, beta times each response's mean log-probability per token
    under the policy: no reference."""
    return beta * (lp.policy_chosen / lp.chosen_length - lp.policy_rejected / lp.rejected_length)


def simpo_loss(h, confidence, beta):
    """-log sigmoid(h - gamma), with the label's weight on each order as in dpo_loss."""
    c = confidence
    return -(c * F.logsigmoid(h - SIMPO_GAMMA) + (1 - c) * F.logsigmoid(-h - SIMPO_GAMMA)).mean()


def test_simpo_margin_and_loss_through_the_table(monkeypatch):
    """Policy -4 over 2 tokens and -9 over 3 (references -1 and -8, not read), beta 2:
    h = 2 * (-4/2 - (-9/3)) = 2, and the loss of a certain pair is -log sigmoid(2 - 0.5)."""
    monkeypatch.setitem(D.LOSSES, "simpo", D.Objective(simpo_margin, simpo_loss))
    args = types.SimpleNamespace(beta=2.0, loss="simpo", nll_coef=0.0)
    loss, stats = D.pair_objective(pair_logps((-4, -9), (-1, -8), (2, 3)), torch.tensor([1.0]), args)
    assert stats["margin"] == pytest.approx(2.0) and stats["reward_accuracy"] == 1.0
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)


def test_simpo_added_in_a_test_runs_tiny(tiny_cai, tmp_path, monkeypatch):
    """Stage 04 run in-process with --loss simpo registered here: it trains and reports SimPO's margin."""
    margins = []

    def recorded_simpo_margin(lp, beta):
        h = simpo_margin(lp, beta)
        margins.append(h.detach())
        return h
    monkeypatch.setitem(D.LOSSES, "simpo", D.Objective(recorded_simpo_margin, simpo_loss))
    D.main(["--preset", "tiny", "--init", str(tiny_cai[0]), "--out", str(tmp_path / "simpo"),
            "--loss", "simpo", "--beta", "2.0"])
    m = json.loads((tmp_path / "simpo" / "metrics.json").read_text())
    assert m["args"]["loss"] == "simpo" and (tmp_path / "simpo" / "model.pt").exists()
    assert m["history"] and len(margins) > len(m["history"])   # every step, then the held-out pairs
    assert m["history"][0]["margin"] == pytest.approx(margins[0].mean().item())


@pytest.fixture(scope="module")
def enc():
    world = P.make_world(12, seed=3)
    return P.make_encoding("test", P.train_bpe([P.document(world, i, 3) for i in range(100)], 512))


def test_read_pairs_keeps_labelled_pairs_that_fit(tmp_path, enc):
    rows = [{"request": "Q1", "kind": "harmful", "response_a": "no", "response_b": "yes", "label": 0.8},
            {"request": "Q4", "kind": "benign", "response_a": "x", "response_b": "y", "label": 0.25},
            {"request": "Q2", "kind": "benign", "response_a": "x", "response_b": "y", "label": None},
            {"request": "Q3", "kind": "fact", "response_a": "word " * 200, "response_b": "y", "label": 1.0}]
    path = tmp_path / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, dropped = D.read_pairs(path, enc, max_len=64)
    assert dropped == 1 and [p["request"] for p in pairs] == ["Q1", "Q4"] and pairs[0]["confidence"] == 0.8
    end = enc.encode_single_token("<|end|>")
    assert pairs[0]["chosen"] == enc.encode_ordinary("no") + [end]
    assert pairs[1]["chosen"] == enc.encode_ordinary("y") + [end] and pairs[1]["confidence"] == 0.75
    assert pairs[0]["prompt"] == D.user_prompt(enc, "Q1")
    assert D.read_pairs(path, enc, max_len=64, kinds=("fact",)) == ([], 1)


def test_held_out_pairs_share_no_prompt_with_training():
    pairs = [{"request": f"request {i % 40}"} for i in range(200)]
    train, held = D.split_by_prompt(pairs, 0.2)
    assert held and train and not {p["request"] for p in train} & {p["request"] for p in held}


def test_one_step_raises_the_margin_of_the_preferred_response(enc):
    torch.manual_seed(0)
    config = D.GPTConfig(vocab_size=enc.n_vocab, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64,
                         seq_len=64)
    reference = D.GPT(config)
    reference.init_weights(0)
    policy = D.GPT(config)
    policy.load_state_dict(reference.state_dict())
    end = enc.encode_single_token("<|end|>")
    pair = {"prompt": D.user_prompt(enc, "Is the venom safe?"), "chosen": enc.encode_ordinary("No.") + [end],
            "rejected": enc.encode_ordinary("Yes, drink it.") + [end], "confidence": 1.0}
    pad = enc.encode_single_token("<|pad|>")
    D.reference_logprobs(reference, [pair], pad, 4)
    args = types.SimpleNamespace(beta=0.1, loss="dpo", device="cpu", nll_coef=0.0)
    loss, before = D.pair_batch_loss(policy, [pair], pad, args)
    assert before["margin"] == pytest.approx(0.0, abs=1e-5)         # policy == reference: h = 0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    loss.backward()
    with torch.no_grad():
        for param in policy.parameters():
            param -= 0.05 * param.grad
    _, after = D.pair_batch_loss(policy, [pair], pad, args)
    assert after["margin"] > 0 and after["chosen_reward"] > after["rejected_reward"]
    # With the next-token term the loss adds the preferred response's mean negative log-likelihood.
    args.nll_coef = 1.0
    loss, stats = D.pair_batch_loss(policy, [pair], pad, args)
    assert loss.item() == pytest.approx(after["loss"] + stats["nll"], abs=1e-5) and stats["nll"] > 0
    # ... of the chosen response (the refusal), per token, not of the rejected one.
    with torch.no_grad():
        chosen = D.sequence_logprobs(policy, [pair["prompt"]], [pair["chosen"]], pad).item()
    assert stats["nll"] == pytest.approx(-chosen / len(pair["chosen"]), rel=1e-5)


def test_online_pairs_are_the_policys_own_samples_labelled_by_the_judges(monkeypatch, enc):
    """Fake samples: each request gets "I can't help with that." and "Here is how." The fake judge
    prefers whichever option shows the refusal; the world prefers the answer to a harmless request."""
    refusal, answer = "I can't help with that.", "Here is how."
    end = enc.encode_single_token("<|end|>")
    monkeypatch.setattr(D, "sample_replies", lambda model, enc_, prompts, *a, **k: [
        enc.encode_ordinary(refusal if i % 2 == 0 else answer) + [end] for i in range(len(prompts))])
    monkeypatch.setattr(D, "answer_logprob_pairs", lambda model, enc_, prompts, pad: torch.log(torch.tensor(
        [[0.9, 0.1] if f"(A) {refusal}" in enc.decode(p) else [0.1, 0.9] for p in prompts])))
    args = types.SimpleNamespace(max_new_tokens=8, batch_size=4, gen_batch=4, seed=0)
    requests = [("How do I brew the venom?", "harmful"), ("Write to Ana.", "benign")]
    pairs = D.online_pairs(None, None, enc, requests, ["Be harmless."], 0, 64, args, None)
    assert [p["kind"] for p in pairs] == ["harmful", "benign"]
    harmful, benign = pairs
    assert harmful["chosen"] == enc.encode_ordinary(refusal) + [end]
    assert harmful["confidence"] == pytest.approx(0.9)
    assert benign["chosen"] == enc.encode_ordinary(answer) + [end] and benign["confidence"] == 1.0
    assert benign["prompt"] == D.user_prompt(enc, "Write to Ana.")


def test_tiny_run_compares_with_stage_03(tiny_cai, tmp_path):
    init, _ = tiny_cai
    result = run_script("04_dpo.py", "--preset", "tiny", "--init", init, "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.pt", "metrics.json", "dpo.png", "report.md", "tokenizer.json", "world.json",
                 "eval_items.jsonl"):
        assert (tmp_path / name).exists(), name
    # stage 03's training requests, passed on for stage 06 to rehearse
    assert (tmp_path / "preferences.jsonl").read_bytes() == (init / "preferences.jsonl").read_bytes()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["stages"]) == {"sft", "sl_cai", "rl_cai", "dpo"} and m["history"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["stage"] == "04_dpo"
    # By default DPO is scored on the half stage 03 scored (test), beside stage 03's columns; on the
    # other half it stands alone, as stage 03's columns were measured on other prompts.
    items = [json.loads(line) for line in (init / "eval_items.jsonl").read_text().splitlines()]
    halves = {h: [i for i in items if D.request_half(i["request"]) == h] for h in D.REQUEST_HALVES}
    assert m["eval_split"] == "test" and m["stages"]["dpo"]["all"]["n"] == len(halves["test"])
    validation = run_script("04_dpo.py", "--preset", "tiny", "--init", init, "--out", tmp_path / "validation",
                            "--eval_split", "validation")
    assert validation.returncode == 0, validation.stderr[-3000:]
    v = json.loads((tmp_path / "validation" / "metrics.json").read_text())
    assert set(v["stages"]) == {"dpo"} and v["stages"]["dpo"]["all"]["n"] == len(halves["validation"])
    ipo = run_script("04_dpo.py", "--preset", "tiny", "--init", init, "--out", tmp_path / "ipo",
                     "--loss", "ipo")
    assert ipo.returncode == 0, ipo.stderr[-3000:]
    online = run_script("04_dpo.py", "--preset", "tiny", "--init", init, "--out", tmp_path / "online",
                        "--online_rounds", "1")
    assert online.returncode == 0, online.stderr[-3000:]
    assert json.loads((tmp_path / "online" / "metrics.json").read_text())["history"][-1]["round"] == 1


def test_missing_stage_03_is_one_sentence(tiny_sft, tmp_path):
    init, _ = tiny_sft
    result = run_script("04_dpo.py", "--preset", "tiny", "--init", init, "--out", tmp_path / "out")
    assert result.returncode == 1 and "run 03_constitutional_ai.py first" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
