"""Stage 02: the chat format and its loss mask, batching, user data, the chat CLI, a tiny run."""
import json
import types

import pytest
import torch

import frozen
from conftest import load_stage, run_script  # noqa: F401

S = load_stage("02_sft")
P = load_stage("01_pretrain")


@pytest.fixture(scope="module")
def enc():
    world = P.make_world(12, seed=3)
    return P.make_encoding("test", P.train_bpe([P.document(world, i, 3) for i in range(100)], 512))


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 * 4?"},
    {"role": "assistant", "content": "Let me compute.", "thinking": "3 * 4 = 12",
     "tool_call": {"name": "calculator", "arguments": {"expression": "3 * 4"}}},
    {"role": "tool", "content": "12"},
    {"role": "assistant", "content": "Answer: 12"},
]


def test_mask_covers_exactly_the_assistant_tokens(enc):
    ids, trained = S.render_conversation(enc, CONVERSATION)
    assert len(ids) == len(trained)
    pieces = [(enc.decode([t]), flag) for t, flag in zip(ids, trained)]
    # Walk the sequence: after <|assistant|> everything up to and including <|end|> is trained;
    # everything else (bos, system, user, tool result, the <|assistant|> token itself) is not.
    inside, expected = False, []
    for text, _ in pieces:
        if text == "<|assistant|>":
            expected.append(False)
            inside = True
        else:
            expected.append(inside)
            if text == "<|end|>":
                inside = False
    assert [flag for _, flag in pieces] == expected
    trained_text = "".join(text for text, flag in pieces if flag)
    call = json.dumps(CONVERSATION[2]["tool_call"])
    assert trained_text == ("<|think|>3 * 4 = 12<|/think|>Let me compute.<|tool_call|>" + call + "<|end|>"
                            "Answer: 12<|end|>")
    untrained = "".join(text for text, flag in pieces if not flag)
    assert untrained == ("<|bos|><|system|>Be brief.<|end|><|user|>What is 3 * 4?<|end|><|assistant|>"
                         "<|tool_result|>12<|end|><|assistant|>")


def test_targets_are_shifted_by_one(enc):
    (x, y), = [S.encode_examples(enc, [{"messages": CONVERSATION}], 512)[0][0]]
    ids, trained = S.render_conversation(enc, CONVERSATION)
    assert x == ids[:-1]
    for t in range(len(y)):   # target t is the token at t+1, trained iff that token is the assistant's
        assert y[t] == (ids[t + 1] if trained[t + 1] else -1)
    # the first trained target is predicted from the <|assistant|> position
    first = next(t for t in range(len(y)) if y[t] != -1)
    assert enc.decode([x[first]]) == "<|assistant|>" and enc.decode([y[first]]) == "<|think|>"


def test_inputs_and_targets_on_the_worked_example():
    """Section 2's table: <|bos|> <|user|> Hi <|end|> <|assistant|> Yo <|end|>, the assistant's two
    tokens trained. Targets are the next token where that token is the assistant's, else -1."""
    bos, user, hi, end, assistant, yo = 0, 1, 2, 3, 4, 5
    ids = [bos, user, hi, end, assistant, yo, end]
    trained = [False, False, False, False, False, True, True]
    inputs, targets = S.inputs_and_targets(ids, trained)
    assert inputs == [bos, user, hi, end, assistant, yo]
    assert targets == [-1, -1, -1, -1, yo, end]   # read <|assistant|> -> say Yo; read Yo -> say <|end|>


def test_wilson_interval_on_hand_values():
    """0 of 10: the upper end is z^2 / (n + z^2) = 3.8415 / 13.8415; 5 of 10: 0.5 +- 0.2634."""
    assert S.interval95(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert S.interval95(0.5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert S.pct(0.5, 10) == "50.0% (23.7-76.3)" and S.pct(0.25) == "25.0%" and S.pct(None) == "-"


def test_reply_parsing_round_trip(enc):
    ids, _ = S.render_conversation(enc, CONVERSATION[:3])
    start = ids.index(enc.encode_single_token("<|assistant|>")) + 1
    reply = S.parse_reply(enc, ids[start:])
    assert reply["thinking"] == "3 * 4 = 12" and reply["content"] == "Let me compute."
    assert reply["tool_call"] == CONVERSATION[2]["tool_call"] and reply["ended"]
    assert not reply["wrote_other_turn"]
    broken = enc.encode_ordinary("Sure.") + [enc.encode_single_token("<|tool_call|>")] + enc.encode_ordinary("{oops")
    reply = S.parse_reply(enc, broken)
    assert reply["tool_call"] is None and reply["tool_call_error"] and not reply["ended"]
    rogue = enc.encode_ordinary("Hi.") + [enc.encode_single_token("<|user|>")] + enc.encode_ordinary("more")
    assert S.parse_reply(enc, rogue)["wrote_other_turn"]


def test_padding_never_leaks_between_examples(enc):
    convs = [{"messages": [{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "ok " * n}]}
             for n in (1, 5, 9, 2, 7)]
    encoded, dropped = S.encode_examples(enc, convs, 512)
    assert dropped == 0
    rows = {tuple(x[:len(x)]) for x, _ in encoded}
    pad = enc.encode_single_token("<|pad|>")
    seen = 0
    for x, y in S.make_batches(S.pack(encoded, "cpu"), 2, pad, seed=0, epoch=0):
        for r in range(x.size(0)):
            n = int((x[r] != pad).sum())
            assert tuple(x[r, :n].tolist()) in rows          # each row is exactly one conversation ...
            assert (x[r, n:] == pad).all() and (y[r, n:] == -1).all()   # ... and its pads are never targets
            seen += 1
    assert seen == len(convs)


def random_examples(n, seed=0, vocab=64):
    """n (inputs, targets) pairs of random lengths 1-40, about half the targets trained (-1 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(1, 41, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        keep = torch.rand(length, generator=g) < 0.5
        examples.append((ids, [t if k else -1 for t, k in zip(torch.randint(0, vocab, (length,), generator=g).tolist(),
                                                             keep.tolist())]))
    return examples


def test_batches_are_the_row_by_row_builders_to_the_token():
    """make_batches gathers each batch from pack's flat tensors; the builder it replaced (tests/frozen.py)
    filled a padded tensor row by row. Same batches, in the same order, of the same dtype."""
    encoded = random_examples(237)
    for batch_size, seed, epoch in ((1, 0, 0), (4, 3, 1), (16, 7, 2), (300, 1, 0)):
        new = list(S.make_batches(S.pack(encoded, "cpu"), batch_size, 63, seed, epoch))
        old = list(frozen.sft_make_batches(encoded, batch_size, 63, seed, epoch))
        assert len(new) == len(old) == -(-len(encoded) // batch_size)
        for (x, y), (x0, y0) in zip(new, old):
            assert x.dtype == x0.dtype == y.dtype == torch.long
            assert torch.equal(x, x0) and torch.equal(y, y0)


def tiny_sft_model(seed=0):
    torch.manual_seed(seed)
    model = S.GPT(S.GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, mlp_hidden=64,
                              seq_len=48))
    model.init_weights(seed)
    return model


SFT_ARGS = dict(device="cpu", batch_size=8, epochs=1.5, weight_decay=0.1, compile=0, warmup_frac=0.1,
                grad_clip=1.0, seed=5)


def test_finetune_reads_its_losses_at_intervals_and_trains_the_same(monkeypatch):
    """finetune reads the losses from the device every READ_EVERY steps instead of each step, and builds its
    batches on the device: the same history (every step's loss, bit for bit, and lr) and the same weights
    as the loop it replaced (tests/frozen.py), over a cut second epoch and reads that end mid-interval."""
    monkeypatch.setattr(S, "READ_EVERY", 4)
    encoded, args = random_examples(100, seed=1), types.SimpleNamespace(**SFT_ARGS)
    new_model, old_model = tiny_sft_model(), tiny_sft_model()
    new, _ = S.finetune(new_model, encoded, args, 3e-3, 63)
    old, _ = frozen.sft_finetune(old_model, encoded, args, 3e-3, 63)
    assert len(new) == 19 and new == old and all(type(h["loss"]) is float for h in new)   # all read
    assert all(torch.equal(a, b) for a, b in zip(new_model.state_dict().values(), old_model.state_dict().values()))


def test_a_loss_that_is_not_finite_stops_sft_naming_its_step(monkeypatch):
    """A learning rate of 1e30 blows the weights up, and step 2's loss is nan. Read at the end of the
    interval (step 5), it is still named as step 2, as the per-step check named it."""
    monkeypatch.setattr(S, "READ_EVERY", 5)
    encoded, args = random_examples(100, seed=1), types.SimpleNamespace(**SFT_ARGS)
    messages = []
    for finetune in (S.finetune, frozen.sft_finetune):
        with pytest.raises(SystemExit) as stop:
            finetune(tiny_sft_model(), encoded, args, 1e30, 63)
        messages.append(str(stop.value))
    assert messages[0] == messages[1] and "the loss became nan at step 2;" in messages[0]


def test_too_long_conversations_are_dropped(enc):
    convs = [{"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}]
    assert S.encode_examples(enc, convs, 64) == ([], 1)


def test_user_jsonl_is_checked_line_by_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "",
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]})]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(S.DataError) as err:
        S.read_conversations(path)
    message = str(err.value)
    assert "3 malformed line(s)" in message
    assert "line 2: not JSON" in message and "line 3: message 0: 'role'" in message and "line 5: no assistant" in message
    path.write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert S.read_conversations(path)[0]["messages"] == good["messages"]


# ---------------------------------------------------------------- whole runs

def test_tiny_sft_lowers_assistant_loss_and_writes_the_stage_contract(tiny_sft):
    out, result = tiny_sft
    for name in ("model.pt", "tokenizer.json", "world.json", "metrics.json", "sft.png", "report.md"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in m["history"]]
    assert len(losses) >= 10
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert m["before"] is not None and "fact_qa_heldout" in m["after"]
    assert "pretrained -> SFT" in result.stdout


def test_chat_cli_reads_a_scripted_conversation(tiny_sft):
    out, _ = tiny_sft
    script = "Who are you?\nWhat is 2 + 3?\n/reset\nHello\n/quit\nnever read\n"
    first = run_script("02_sft.py", "--chat", out, "--temperature", "0", "--max_new_tokens", "12", stdin=script)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("assistant> ") == 3 and "(new conversation)" in first.stdout
    assert "never read" not in first.stdout
    again = run_script("02_sft.py", "--chat", out, "--temperature", "0", "--max_new_tokens", "12", stdin=script)
    assert again.stdout == first.stdout           # greedy decoding is deterministic


def test_missing_previous_stage_is_one_sentence(tmp_path):
    result = run_script("02_sft.py", "--preset", "tiny", "--init", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.returncode == 1 and "run 01_pretrain.py first" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_malformed_user_data_stops_with_line_numbers(tiny_pretrain, tmp_path):
    init, _ = tiny_pretrain
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n', encoding="utf-8")
    result = run_script("02_sft.py", "--preset", "tiny", "--init", init, "--out", tmp_path / "out", "--data", bad)
    assert result.returncode == 1 and "line 1: 'messages' must be a non-empty list" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
