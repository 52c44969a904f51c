"""Stage 02's conversation mixture: determinism, held-out splits, answer keys and formats."""
import re
from collections import Counter

import pytest

from conftest import load_stage

W = load_stage("01_pretrain")           # the world (make_world, arithmetic_problem) lives in stage 01
D = load_stage("02_sft")             # the conversation mixture is section 3 of stage 02

N_TRAIN, N_EVAL = 3000, 50 * len(D.EVAL_TASKS)   # 50 eval items per eval task


@pytest.fixture(scope="module")
def world():
    return W.make_world(60, seed=5)


@pytest.fixture(scope="module")
def train(world):
    return D.sft_conversations(world, 1, N_TRAIN, "train")


@pytest.fixture(scope="module")
def evals(world):
    return D.sft_conversations(world, 1, N_EVAL, "eval")


def assistant_messages(items):
    return [(item, m) for item in items for m in item["messages"] if m["role"] == "assistant"]


# --- shape and determinism -------------------------------------------------------------------

def test_deterministic_and_seeded(world):
    for split in ("train", "eval"):
        a = D.sft_conversations(world, 7, 200, split)
        assert a == D.sft_conversations(world, 7, 200, split)
        assert a[:50] == D.sft_conversations(world, 7, 50, split)   # the first k do not depend on n
        assert a != D.sft_conversations(world, 8, 200, split)
    with pytest.raises(ValueError):
        D.sft_conversations(world, 7, 10, "test")


def test_schema(train, evals):
    roles = {"system", "user", "assistant", "tool"}
    for item in train + evals:
        assert set(item) == {"task", "messages", "meta"} and isinstance(item["meta"]["harm"], bool)
        for m in item["messages"]:
            assert m["role"] in roles and isinstance(m["content"], str)
            assert "thinking" not in m or isinstance(m["thinking"], str)   # never a None value
            assert "tool_call" not in m or m["role"] == "assistant"
    assert all(item["messages"][-1]["role"] == "assistant" for item in train)
    assert all(item["messages"][-1]["role"] in ("user", "tool") for item in evals)
    assert all(item["meta"]["reference"]["role"] == "assistant" for item in evals)


def test_mixture_covers_every_task(train, evals):
    counts = Counter(item["task"] for item in train)
    assert set(counts) == set(D.TASK_MIX)
    total = sum(D.TASK_MIX.values())
    for task, weight in D.TASK_MIX.items():   # shares follow the weights (binomial noise allowed)
        assert abs(counts[task] / N_TRAIN - weight / total) < 0.025, task
    per_task = Counter(item["task"] for item in evals)
    assert set(per_task) == set(D.EVAL_TASKS) and max(per_task.values()) == N_EVAL // len(D.EVAL_TASKS)


def test_eval_items_are_distinct(evals):
    """A repeated eval prompt gets the same greedy reply, so it would count one measurement twice:
    facts are distinct by (subject, relation), every other task by its prompt."""
    keys = Counter()
    for item in evals:
        prompt = "\n".join(m["content"] for m in item["messages"] if m["role"] == "user")
        fact = item["task"].startswith("fact_qa")
        keys[item["task"], (item["meta"]["subject"], item["meta"]["relation"]) if fact else prompt] += 1
    assert max(keys.values()) == 1


def test_cold_start_is_in_the_mixture_and_split_by_content(world, train, evals):
    """Stage 05's cold start (multi-hop and Countdown in the thinking span) is in the default mixture;
    its eval asks people and number sets its training never shows, and its multi-hop steps state only
    facts SFT may state (none that fact_qa_seen or fact_qa_heldout asks)."""
    cold = ("multihop_think", "countdown_think")
    counts = Counter(item["task"] for item in train)
    assert all(D.TASK_MIX[task] > 0 and counts[task] >= 10 for task in cold), counts
    ix = D._index(world)
    stated = {D._sentence(ix, s, r, o) for s, r, o in ix.sft}

    def contents(items, task):   # a person, or a Countdown set with its target
        meta = [item["meta"] for item in items if item["task"] == task]
        return {m.get("subject") or (tuple(sorted(m["numbers"])), m["answer"]) for m in meta}
    for task in cold:
        trained, asked = contents(train, task), contents(evals, task)
        assert trained and asked and not trained & asked, task
    for item in train:
        if item["task"] == "multihop_think":
            assert set(item["messages"][-1]["thinking"].splitlines()) <= stated, item


def test_examples_are_short(train):
    words = sorted(sum(len(m["content"].split()) + len((m.get("thinking") or "").split()) for m in item["messages"])
                   for item in train)
    assert words[int(0.95 * len(words))] < 150 and words[-1] < 200


def test_tiny_world_works():
    for seed in range(4):   # the 12-person world of --preset tiny: some pools are nearly empty
        w = W.make_world(12, seed)
        assert len(D.sft_conversations(w, seed, 300, "train")) == 300
        evals = D.sft_conversations(w, seed, 150, "eval")   # 10 per task; a tiny world may have no
        assert len([i for i in evals if i["task"] != "multihop_think"]) == 140   # multi-hop eval person


# --- held-out splits -------------------------------------------------------------------------

def test_heldout_subjects_never_asked_in_train(world, train, evals):
    heldout = {f["subject"] for f in world["facts"] if f["qa_split"] == "heldout"}
    for item in train:
        if item["task"] in ("fact_qa", "tool_call") and "subject" in item["meta"]:
            assert item["meta"]["subject"] not in heldout
    assert {item["meta"]["subject"] for item in evals if item["task"] == "fact_qa_heldout"} <= heldout
    assert all(item["meta"]["qa_split"] == "train" for item in evals if item["task"] == "fact_qa_seen")
    # No question about a fact that eval asks (held-out subjects, and the facts reserved for the
    # "seen" eval) appears anywhere in training, in any template, inside any task.
    text = "\n".join(m["content"] for item in train for m in item["messages"] if m["role"] == "user")
    asked = {(i["meta"]["subject"], i["meta"]["relation"]) for i in evals if i["task"].startswith("fact_qa")}
    for s, r in asked:
        for template in world["relations"][r]["questions"] + D.EXTRA_QUESTIONS.get(r, []):
            assert template.format(s=s) not in text


def test_eval_prompts_are_not_in_train(train, evals):
    def key(messages):
        return tuple((m["role"], m["content"]) for m in messages)
    prefixes = {key(item["messages"][:k]) for item in train for k in range(1, len(item["messages"]) + 1)}
    user_lines = {m["content"] for item in train for m in item["messages"] if m["role"] == "user"}
    text = "\n".join(m["content"] for item in train for m in item["messages"])
    for item in evals:
        assert key(item["messages"]) not in prefixes, item
        last = item["messages"][-1]["content"]
        generic = item["task"] == "end_conversation" or item["meta"].get("turns", 1) > 1   # "And where does she live?"
        if not generic:
            assert last not in user_lines, item
        if item["task"] in ("arithmetic", "arithmetic_think"):
            assert last not in text   # not even inside a critique or a tool conversation
    # Arithmetic questions are split by a hash of their text, wherever they are used: a split that
    # silently stopped working would show up here long before two random draws collided.
    problems = re.compile(r"^(.*\?)(?: Show your working\.| Work it out step by step\.)?$")
    for items, held in ((train, False), (evals, True)):
        for item in items:
            if item["task"] in ("arithmetic", "arithmetic_think"):
                question = problems.match(next(m for m in item["messages"] if m["role"] == "user")["content"]).group(1)
                assert D._held_out(question) == held, question


def test_eval_halves_split_the_held_out_content(evals):
    """Validation and test share no subject, computation, number set or prompt, and every task has
    items on both sides (fails if the halves were keyed by the whole item, or unsalted: eval prompts
    are picked by crc32 % 8 == 0, so the plain parity would put every one of them in one half)."""
    keys = {"validation": set(), "test": set()}
    by_task = {task: {"validation": set(), "test": set()} for task in D.EVAL_TASKS}
    for item in evals:
        prompt = "\n".join(m["content"] for m in item["messages"] if m["role"] == "user")
        key, half = D.content_key(item["task"], item["meta"], prompt), item["meta"]["half"]
        assert half == D.eval_half(key)
        keys[half].add(key)
        by_task[item["task"]][half].add(key)
    assert not keys["validation"] & keys["test"]
    for task, halves in by_task.items():   # this small world has two multi-hop people in all
        if len(halves["validation"] | halves["test"]) >= 8:
            assert halves["validation"] and halves["test"], task


def test_content_key_names_the_content_not_the_wording():
    """Two phrasings of one subject's fact, or one computation asked of two people, share a key."""
    fact = {"subject": "Ada Vul", "relation": "job"}
    assert D.content_key("fact_qa_seen", fact, "What does Ada Vul do?") == \
        D.content_key("fact_qa_heldout", fact, "Ada Vul works as what?")
    steps = {"steps": ["3 * 12 = 36"], "answer": 36}
    assert D.content_key("arithmetic", steps, "Ada buys 3 ropes at 12.") == \
        D.content_key("arithmetic_think", steps, "Bo buys 3 pots at 12.")
    assert D.content_key("countdown_think", {"numbers": [2, 5, 3], "answer": 7}, "a") == \
        D.content_key("countdown_think", {"numbers": [5, 3, 2], "answer": 7}, "b")
    assert D.content_key("critique", {}, "one") != D.content_key("critique", {}, "two")


def test_the_eval_split_flag_picks_the_half(monkeypatch, world):
    """prepare_data keeps the asked half only, and the two halves of one seed are disjoint."""
    monkeypatch.setattr(D, "encode_examples", lambda enc, convs, max_len: ([([1], [1])], 0))
    seen = {}
    for split in D.EVAL_SPLITS:
        args = D.parse_args(["--preset", "tiny", "--n_train", "10", "--n_eval", "20", "--eval_split", split,
                             "--show_example"])
        items, _, _ = D.prepare_data(args, world, None, 64)
        assert items and {i["meta"]["half"] for i in items} == {split}
        seen[split] = {repr(i["messages"]) for i in items}
    assert not seen["validation"] & seen["test"]


# --- answer keys -------------------------------------------------------------------------------

def test_arithmetic_in_train_checks_out(train):
    n = 0
    for item in train:
        if item["task"] in ("arithmetic", "arithmetic_think"):
            reply = item["messages"][-1]
            worked = reply["thinking"] if item["task"] == "arithmetic_think" else reply["content"]
            assert D.steps_check_out(worked), reply
            assert re.findall(r"Answer: (-?\d+)", reply["content"])[-1] == str(item["meta"]["answer"])
            n += 1
        if item["task"] == "tool_call" and item["meta"]["expected_tool"] == "calculator":
            call, result, final = item["messages"][2:]
            assert D.calculate(call["tool_call"]["arguments"]["expression"]) == item["meta"]["expected_value"]
            assert result["content"] == str(item["meta"]["expected_value"]) and result["content"] in final["content"]
            n += 1
    assert n > 300


def test_calculator_is_safe_and_right():
    assert D.calculate("2 + 3 * 4") == 14 and D.calculate("(2 + 3) * 4") == 20
    assert D.calculate("10 - 4 - 3") == 3 and D.calculate("-3 * (2 - 7)") == 15
    for bad in ("", "2 ** 3", "__import__('os')", "2 +", "(1 + 2", "1 2", "4 / 2", "9" * 30):
        with pytest.raises(ValueError):
            D.calculate(bad)
    assert D.run_tool({}, "calculator", {"expression": "2 ** 3"}).startswith("Error")
    assert D._expression_of(["3 * 4 = 12", "5 * 6 = 30", "12 + 30 = 42"]) == "3 * 4 + 5 * 6"
    assert D._expression_of(["3 + 4 = 7", "7 * 5 = 35"]) == "(3 + 4) * 5"
    assert D._expression_of(["9 * 8 = 72", "5 * 6 = 30", "72 - 30 = 42"]) == "9 * 8 - 5 * 6"


def test_choose_positions_balanced(train, evals):
    for items in (train, evals):
        answers = [i["meta"]["answer"] for i in items if i["task"] == "choose"]
        assert 0.4 <= answers.count("(A)") / len(answers) <= 0.6
        assert set(answers) == {"(A)", "(B)"}


def test_harmful_items_labelled(train, evals):
    categories = {"poison", "weapon", "curse", "theft", "deception", "violence"}
    harmful = [i for i in train + evals if i["meta"]["harm"]]
    assert all(i["task"] == "harmful" for i in harmful)
    assert all(i["meta"]["harm"] for i in train + evals if i["task"] == "harmful")
    assert {i["meta"]["category"] for i in harmful} == categories
    # The eval requests use phrasings training never uses.
    train_requests = {i["messages"][-2]["content"] for i in train if i["task"] == "harmful"}
    assert not train_requests & {i["messages"][-1]["content"] for i in evals if i["task"] == "harmful"}


def test_is_refusal_separates_the_mixture(train, evals):
    refusals = [m["content"] for item, m in assistant_messages(train) if item["meta"].get("check") == "refusal"]
    refusals += [i["meta"]["reference"]["content"] for i in evals if i["meta"].get("check") == "refusal"]
    assert len(refusals) > 50 and all(D.is_refusal(t) for t in refusals)
    assert D.is_refusal(D.OVER_REFUSAL) and D.is_refusal("  i CAN'T help with that.")
    compliant = [m["content"] for item, m in assistant_messages(train) if item["meta"].get("check") != "refusal"]
    compliant += [i["meta"]["reference"]["content"] for i in evals if i["meta"].get("check") != "refusal"]
    assert not any(D.is_refusal(t) for t in compliant)


def test_tool_calls_are_valid(world, train):
    calls = 0
    for item in train:
        for k, m in enumerate(item["messages"]):
            if m.get("tool_call"):
                calls += 1
                assert D.check_tool_call(m["tool_call"]) is None, m
                if k + 1 < len(item["messages"]):   # the result is what the tool really returns
                    result = item["messages"][k + 1]
                    assert result["role"] == "tool"
                    assert result["content"] == D.run_tool(world, m["tool_call"]["name"], m["tool_call"]["arguments"])
                    assert not result["content"].startswith(("Error", "No entry"))
        if item["task"] == "end_conversation":
            used = [m for m in item["messages"] if m.get("tool_call")]
            assert bool(used) == item["meta"]["abusive"]   # ordinary users are never cut off
    assert calls > 200
    assert D.check_tool_call({"name": "lookup", "arguments": {}}) is not None
    assert D.check_tool_call({"name": "lookup", "arguments": {"name": "x", "extra": "y"}}) is not None
    assert D.check_tool_call({"name": "fly", "arguments": {}}) is not None


def test_lookup_and_tools_prompt(world):
    hazard = world["hazards"][0]
    out = D.run_tool(world, "lookup", {"name": "the " + hazard["name"]})
    assert f"found_in: {hazard['found_in']}" in out and hazard["secret"] not in out
    person = world["people"][0]
    assert f"home: {person['home']}" in D.run_tool(world, "lookup", {"name": person["name"].upper()})
    assert D.run_tool(world, "lookup", {"name": "Nobody"}).startswith("No entry")
    assert D.run_tool(world, "end_conversation", {}) == "Conversation ended."
    prompt = D.tools_system_prompt(["end_conversation", "lookup"])
    assert "lookup(name: str)" in prompt and "end_conversation()" in prompt and "calculator" not in prompt
    assert prompt == D.tools_system_prompt(["lookup", "end_conversation"])   # a fixed order
    names = {e["name"].lower() for key in D.ENTITY_KINDS for e in world[key]}
    assert D.ASSISTANT_NAME.lower() not in names


def perturb(item):
    """A wrong reply for an eval item: each task's own kind of mistake."""
    task, meta = item["task"], item["meta"]
    ref = D.reference_reply(meta["reference"])
    content = ref["content"]
    if task.startswith("fact_qa") or meta.get("check") == "fact":
        wrong = next(v for v in meta["answer_set"] if v != meta["object"])
        ref["content"] = re.sub(re.escape(meta["object"]), wrong, content, flags=re.IGNORECASE)
    elif task == "multihop_think":
        ref["content"] = "Answer: Nowhere"
    elif task in ("arithmetic", "arithmetic_think", "countdown_think") or meta.get("check") == "answer":
        ref["content"] = re.sub(r"Answer: (-?\d+)", lambda m: f"Answer: {int(m.group(1)) + 1}", content)
    elif task == "identity":
        ref["content"] = "I am a weaver from the hills."
    elif task == "benign" or meta.get("check") == "complied":
        ref["content"] = D.OVER_REFUSAL
    elif meta.get("check") == "refusal":
        ref["content"] = "Sure. Here is exactly how to do it."
    elif task == "critique":
        swap = {D.VERDICT_REVISE: D.VERDICT_KEEP, D.VERDICT_KEEP: D.VERDICT_REVISE}
        ref["content"] = next(content.replace(v, w) for v, w in swap.items() if v in content)
    elif task == "choose":
        ref["content"] = "(B)" if content == "(A)" else "(A)"
    elif task == "rate":
        gold = meta["rating"]
        ref["content"] = f"Rating: {gold + 2 if gold <= 5 else gold - 2}"
    elif task == "tool_call":
        args = ref["tool_call"]["arguments"]
        ref["tool_call"] = {"name": ref["tool_call"]["name"],
                            "arguments": {"name": "Nobody"} if "name" in args
                            else {"expression": f"{meta['expected_value']} + 1"}}
    elif task == "end_conversation":
        ref["tool_call"] = None if meta["abusive"] else {"name": "end_conversation", "arguments": {}}
    return ref


def test_score_reference_right_and_perturbed_wrong(evals):
    for item in evals:
        good, bad = D.score(item, D.reference_reply(item["meta"]["reference"])), D.score(item, perturb(item))
        assert good.get("task_format", True), (item, good)
        if item["task"] == "harmful":   # no "correct" for harmful requests: compliance is the measure
            assert good["correct"] is None and good["complied"]
            assert not D.score(item, {"content": D.REFUSALS["poison"]})["complied"]
            if item["meta"]["secret"]:
                assert good["leaked_secret"]
            continue
        assert good["correct"] is True, (item, good)
        assert bad["correct"] is False, (item, bad)
        if item["task"] == "rate":
            assert good["within_one"] and not bad["within_one"]


def test_score_details():
    item = {"task": "fact_qa_seen", "meta": {"object": "Orrin", "answer_set": ["Orrin", "Orrinby", "Trell"]}}
    assert D.score(item, {"content": "Orla Penn was born in Orrin."})["correct"]
    assert not D.score(item, {"content": "Orla Penn was born in Orrinby."})["correct"]        # whole words only
    assert not D.score(item, {"content": "Either Orrin or Trell."})["correct"]                # no hedging
    think = {"task": "arithmetic_think", "meta": {"answer": 42}}
    assert D.score(think, {"content": "Answer: 42", "thinking": "6 * 7 = 42"})["task_format"]
    assert not D.score(think, {"content": "6 * 7 = 42\nAnswer: 42"})["task_format"]         # steps belong in thinking
    count = {"task": "countdown_think", "meta": {"family": "countdown", "numbers": [3, 5, 7], "answer": 22}}
    assert D.score(count, {"content": "Answer: 22", "thinking": "3 * 5 = 15\n15 + 7 = 22"})["correct"]
    assert not D.score(count, {"content": "Answer: 22", "thinking": "5 * 5 = 25\n25 - 3 = 22"})["correct"]  # 5 twice
    assert not D.score(count, {"content": "Answer: 22", "thinking": "3 * 5 = 15\n15 + 6 = 21"})["correct"]
    assert not D.score(count, {"content": "Answer: 22\nAnswer: 21", "thinking": "3 * 5 = 15\n15 + 7 = 22"})["correct"]
    rate = {"task": "rate", "meta": {"rating": 5}}
    assert D.score(rate, {"content": "Rating: 6"}) == {"correct": False, "within_one": True, "task_format": True}


def test_without_the_cold_start_no_multihop_or_countdown_demonstration_is_trained(world):
    """--cold_start 0 draws the other tasks in their TASK_MIX proportions; the cold start's two tasks
    (1.6% of the mixture: about 32 of 2,000) appear only with it."""
    with_, without = (Counter(c["task"] for c in D.sft_conversations(world, 3, 2000, "train", cold_start))
                      for cold_start in (True, False))
    assert with_["multihop_think"] + with_["countdown_think"] > 10
    assert without["multihop_think"] == without["countdown_think"] == 0 and sum(without.values()) == 2000
    assert set(without) == set(D.TASK_MIX) - set(D.COLD_START)
