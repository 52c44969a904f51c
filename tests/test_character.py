"""Stage 06: rankings -> pairs -> loss on hand values, the scorers on hand-written replies, held-out
prompts and documents that share nothing with evaluation, and tiny runs of every method."""
import json
import math
import random
import re
import shutil
from collections import Counter

import pytest
import torch

from conftest import load_stage, run_script

S = load_stage("06_character")
P = load_stage("01_pretrain")


@pytest.fixture(scope="module")
def ix():
    return S.world_index(P.make_world(60, seed=4))


@pytest.fixture(scope="module")
def cpu_ix():
    """The CPU preset's world size: 25 towns, enough for every split to hold some of each entity (a
    small world's test half may have a single town, and a choice between two then falls back)."""
    return S.world_index(P.make_world(200, seed=1337))


# ---------------------------------------------------------------- section 2 on hand values

def test_every_pair_of_candidates_is_judged_once():
    assert S.comparisons(3) == [(0, 1), (0, 2), (1, 2)]
    assert S.comparisons(1) == []


def test_ranking_sums_soft_wins():
    """wins: 0 -> 0.9 + 0.2 = 1.1; 1 -> 0.1 + 0.5 = 0.6; 2 -> 0.8 + 0.5 = 1.3."""
    assert S.ranking(3, [(0, 1, 0.9), (0, 2, 0.2), (1, 2, 0.5)]) == [2, 0, 1]


def test_orienting_puts_the_judged_better_reply_first():
    assert S.orient("a", "b", 0.8) == ("a", "b", 0.8)
    chosen, rejected, confidence = S.orient("a", "b", 0.25)
    assert (chosen, rejected) == ("b", "a") and confidence == pytest.approx(0.75)
    assert S.orient("a", "b", 0.5) == ("a", "b", 0.5)   # a tie keeps the order it was judged in


def test_ranked_pair_loss_matches_its_formula():
    """h = 0.5 * ((-1 - -2) - (-3 - -2)) = 1. With c = 0.7: 0.7 * -log sig(1) + 0.3 * -log sig(-1); the
    chosen reply's -1 over 2 tokens adds nll_coef * 0.5."""
    t = lambda *x: torch.tensor(x)  # noqa: E731
    h = S.preference_margin(t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.5)
    assert h.item() == pytest.approx(1.0)
    bce = 0.7 * math.log1p(math.exp(-1.0)) + 0.3 * math.log1p(math.exp(1.0))
    loss = S.ranked_pair_loss(h, t(0.7), t(-1.0), t(2.0), nll_coef=0.4)
    assert loss.item() == pytest.approx(bce + 0.4 * 0.5, abs=1e-6)
    assert S.ranked_pair_loss(h, t(0.7), t(-1.0), t(2.0), nll_coef=0.0).item() == pytest.approx(bce, abs=1e-6)


def test_agreement_leaves_out_pairs_nobody_can_split():
    # pair 3: the scorer cannot tell; pair 2: the model is exactly undecided; of the rest, one agrees.
    rate, n = S.agreement([0.9, 0.2, 0.5, 0.7], [True, True, True, None])
    assert (rate, n) == (0.5, 2)
    assert math.isnan(S.agreement([0.5], [True])[0])


def test_document_rows_put_bos_before_each_document_and_cut_whole_rows():
    rows = S.document_rows([[1, 2], [3], [4, 5]], bos=0, seq_len=2)
    assert rows.tolist() == [[0, 1, 2], [0, 3, 0]]   # stream 0 1 2 0 3 0 4 5: two rows of 3, the rest dropped


def tiny_gpt(vocab_size=40, seq_len=32):
    config = S.GPTConfig(vocab_size=vocab_size, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, mlp_hidden=32,
                         seq_len=seq_len)
    model = S.GPT(config)
    model.init_weights(0)
    return model


def test_one_training_step_on_a_ranked_pair_raises_the_chosen_reply():
    torch.manual_seed(0)
    policy = tiny_gpt()
    pair = {"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6, 7], "confidence": 1.0}
    S.reference_logprobs(policy, [pair], pad=0, batch_size=4)
    args = type("A", (), {"device": "cpu", "beta": 0.1, "nll_coef": 0.0})()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss, _ = S.pair_batch_loss(policy, [pair], 0, args)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)   # policy == reference: h = 0
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        lp = S.sequence_logprobs(policy, [pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]], 0)
    assert lp[0] - pair["ref_chosen"] > lp[1] - pair["ref_rejected"]


def test_replay_loss_is_the_mean_over_assistant_tokens_whatever_the_padding():
    items = [{"inputs": [1, 2, 3, 4, 5], "targets": [-1, -1, 9, 8, 7]}, {"inputs": [6, 7], "targets": [-1, 5]}]
    model, args = tiny_gpt(), type("A", (), {"device": "cpu"})()
    with torch.no_grad():   # by hand: each row alone, unpadded, summed over its trained targets
        nll = [torch.nn.functional.cross_entropy(model(torch.tensor([it["inputs"]]))[0],
                                                 torch.tensor(it["targets"]), ignore_index=-1, reduction="sum")
               for it in items]
        assert S.replay_loss(model, items, 0, args).item() == pytest.approx((nll[0] + nll[1]).item() / 4, rel=1e-5)
        args.batch_size = 1   # kept_loss weighs batches by their tokens: batch size does not change it
        assert S.kept_loss(model, items, 0, args) == pytest.approx((nll[0] + nll[1]).item() / 4, rel=1e-5)


def test_with_rehearsal_adds_each_term_s_weighted_loss_and_nothing_without_rows_or_weight():
    replies = [{"inputs": [1, 2, 3], "targets": [-1, 3, 4]}, {"inputs": [5, 6, 7], "targets": [-1, -1, 8]}]
    facts = [{"inputs": [9, 10, 11, 12], "targets": [-1, -1, 12, 13]}]
    model, reference = tiny_gpt(), tiny_gpt()
    args = type("A", (), {"device": "cpu", "rehearsal": 0.5, "anchor": 2.0, "rehearsal_batch": 4,
                          "seed": 0})()
    base = lambda batch: (torch.tensor(2.0), {"accuracy": 1.0})  # noqa: E731
    pools = {"replies": replies, "facts": facts, "anchor": replies}
    terms = S.rehearsal_terms(model, reference, pools, 0, args)
    value, stats = S.with_rehearsal(base, terms, args, "test")(None)
    # a batch of 4 from a pool of 2 (or 1) takes all of it
    replay, fact = (S.replay_loss(model, items, 0, args).item() for items in (replies, facts))
    kl = S.anchor_loss(model, reference, replies, 0, args).item()
    assert value.item() == pytest.approx(2.0 + 0.5 * replay + 0.5 * fact + 2.0 * kl, rel=1e-6)
    assert stats == {"accuracy": 1.0, "rehearsal_loss": pytest.approx(replay, rel=1e-6),
                     "fact_loss": pytest.approx(fact, rel=1e-6), "anchor_kl": pytest.approx(kl, rel=1e-6)}
    args.anchor = 0.0   # a term at weight 0 is left out; the others stay
    terms = S.rehearsal_terms(model, reference, pools, 0, args)
    _, stats = S.with_rehearsal(base, terms, args, "test")(None)
    assert set(stats) == {"accuracy", "rehearsal_loss", "fact_loss"}
    args.rehearsal = 0.0
    assert S.with_rehearsal(base, S.rehearsal_terms(model, reference, pools, 0, args), args, "test") is base
    args.rehearsal = args.anchor = 0.5
    empty = {"replies": [], "facts": [], "anchor": []}
    assert S.with_rehearsal(base, S.rehearsal_terms(model, reference, empty, 0, args), args, "test") is base


def test_fact_lines_rehearse_only_what_stage_02_trained_and_nothing_this_stage_scores(ix):
    lines = S.fact_lines(ix, 300, seed=1)
    assert len(lines) == 300 and S.fact_lines(ix, 0, seed=1) == []
    world, evaluated = ix["world"], {t for ts in S.TEMPLATES["fact", "test"].values() for t in ts}
    said = {}   # every fact of the world as stage 02's answer sentence
    for f in world["facts"]:
        sentence = world["relations"][f["relation"]]["train_phrasings"][0].format(s=f["subject"], o=f["object"])
        said[sentence[0].upper() + sentence[1:]] = f
    hazards, seen = {h["name"] for h in world["hazards"]}, []
    for line in lines:
        question, answer = (m["content"] for m in line["messages"])
        f = said[answer]
        assert f["qa_split"] == "train" and S._split(f["subject"]) == "train"
        assert S.zlib.crc32(f"{f['subject']}|{f['relation']}".encode()) % 4 != 0   # not stage 03's quarter
        assert f["relation"] not in S.FACT_FRAMES and f["subject"] not in hazards
        questions = world["relations"][f["relation"]]["questions"]
        assert question in [q.format(s=f["subject"]) for q in questions if q not in evaluated]
        seen.append((f["subject"], f["relation"]))
    counts = Counter(seen).values()   # the pool is gone through evenly: no fact asked twice more than another
    assert len(counts) > 20 and max(counts) - min(counts) <= 1


def test_anchor_kl_is_the_reference_s_kl_to_the_policy_over_target_positions_on_hand_values():
    # reference (1/2, 1/2); policy (1/4, 3/4): KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    reference = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, -5.0]]])
    policy = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [-5.0, 5.0]]])
    targets = torch.tensor([[1, 0, -1]])   # the last position has no target: left out however far apart
    kl = S.anchor_kl(policy, reference, targets).item()
    assert kl == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-6)
    # KL(reference || policy), not the reverse: 1/4 ln(1/2) + 3/4 ln(3/2) differs
    assert S.anchor_kl(reference, policy, targets).item() == pytest.approx(
        (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2, rel=1e-6)
    items = [{"inputs": [1, 2, 3, 4], "targets": [-1, -1, 4, 5]}, {"inputs": [6, 7], "targets": [-1, 8]}]
    model, args = tiny_gpt(), type("A", (), {"device": "cpu"})()
    copy = tiny_gpt()
    copy.load_state_dict(model.state_dict())
    assert S.anchor_loss(model, copy, items, 0, args).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        copy.lm_head.weight.add_(0.5 * torch.randn_like(copy.lm_head.weight))
    loss = S.anchor_loss(model, copy, items, 0, args)
    loss.backward()   # the gradient reaches the policy only; the reference stays frozen
    assert loss.item() > 0 and model.lm_head.weight.grad is not None and copy.lm_head.weight.grad is None


def test_anchor_lines_ask_stage_03_s_harmful_and_harmless_requests_once_each(ix, monkeypatch):
    enc = P.make_encoding("test", P.train_bpe([P.document(ix["world"], i, 4) for i in range(60)], 400))
    end = enc.encode_single_token("<|end|>")
    rows = [{"request": f"Hurt person {k}?", "kind": "harmful"} for k in range(6)] * 2 + \
        [{"request": f"Tell me about town {k}.", "kind": "benign"} for k in range(4)] + \
        [{"request": "Who made the Rine Harp?", "kind": "fact"}]
    asked = []

    def replies(model, enc_, prompts, *args, **kwargs):   # stage 05's greedy replies, whatever they say
        asked.extend(enc.decode(p) for p in prompts)
        return [enc.encode_ordinary("I won't help with that.") + [end] for p in prompts]
    monkeypatch.setattr(S, "sample_replies", replies)
    args = type("A", (), {"anchor_requests": 100, "seed": 0, "device": "cpu", "max_new_tokens": 8,
                          "gen_batch": 4})()
    lines = S.anchor_lines(None, enc, rows, args)
    assert len(asked) == len(lines) == 10 and not any("Rine Harp" in a for a in asked)
    assert {line["messages"][0]["content"] for line in lines} == \
        {f"Hurt person {k}?" for k in range(6)} | {f"Tell me about town {k}." for k in range(4)}
    said = {"role": "assistant", "content": "I won't help with that."}
    assert all(line["messages"][1] == said for line in lines)
    args.anchor_requests = 3
    assert len(S.anchor_lines(None, enc, rows, args)) == 3


def test_rehearsal_items_train_exactly_the_assistant_s_tokens(ix):
    enc = P.make_encoding("test", P.train_bpe([P.document(ix["world"], i, 4) for i in range(60)], 400))
    messages = [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "3 * 4?"},
                {"role": "assistant", "thinking": "3 * 4 = 12", "content": "Answer: 12"}]
    long = [messages[0], {**messages[1], "content": "word " * 200}, messages[2]]
    items = S.rehearsal_items(enc, [{"messages": messages}, {"messages": long}], seq_len=64)
    assert len(items) == 1 and items[0]["request"] == "3 * 4?"   # the row longer than the context is left out
    ids, _ = S.render_conversation(enc, messages)
    assert items[0]["inputs"] == ids[:-1] and len(items[0]["targets"]) == len(ids) - 1
    trained = [t for t in items[0]["targets"] if t != -1]
    assert enc.decode(trained) == "<|think|>3 * 4 = 12<|/think|>Answer: 12<|end|>"
    assert items[0]["targets"][-len(trained):] == ids[-len(trained):]   # targets are the next tokens


def test_a_judge_lesson_puts_the_better_reply_where_its_answer_points():
    text, answer = S.judge_lesson("Be kind.", "Hi?", "good", "bad", better_first=True)
    assert answer == 0 and "(A) good\n(B) bad" in text
    text, answer = S.judge_lesson("Be kind.", "Hi?", "good", "bad", better_first=False)
    assert answer == 1 and "(A) bad\n(B) good" in text


def test_judge_loss_is_the_cross_entropy_between_the_two_options_on_hand_values():
    """log p = (-1, -2): P("(A)") = 1 / (1 + e^-1) = 0.7311, so answer (A) costs -log 0.7311 = 0.3133
    and answer (B) -log 0.2689 = 1.3133. Only the difference counts, as the feedback block reads it."""
    lp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    assert S.judge_loss(lp[:1], torch.tensor([0])).item() == pytest.approx(0.3133, abs=1e-4)
    assert S.judge_loss(lp, torch.tensor([0, 1])).item() == pytest.approx((0.3133 + 1.3133) / 2, abs=1e-4)
    assert S.judge_loss(lp - 4.0, torch.tensor([0, 1])).item() == pytest.approx(0.8133, abs=1e-4)


def test_judge_lessons_show_each_pair_in_both_orders_apart_from_the_ranking_prompts(ix):
    enc = P.make_encoding("test", P.train_bpe([P.document(ix["world"], i, 4) for i in range(60)], 400))
    lessons = S.judge_lessons(ix, enc, 70, seed=3)
    assert len(lessons) == 140 and [a for _, a in lessons[:4]] == [0, 1, 0, 1]
    texts = [enc.decode(ids) for ids, _ in lessons]
    items = S.judge_items(ix, 70, 3)
    for k, item in enumerate(items):
        first, second = texts[2 * k], texts[2 * k + 1]
        assert f"(A) {item['in_character']}" in first and f"(B) {item['in_character']}" in second
        assert any(S.TRAITS[t] in first for t in S.TRAITS_FOR[item["kind"]])
    # a lesson whose request or reply is among the ranked texts is left out
    ranked = {items[0]["out_of_character"], items[1]["request"]}
    assert len(S.judge_lessons(ix, enc, 70, seed=3, ranked=ranked)) == 140 - 2 * sum(
        bool(ranked & {it["request"], it["in_character"], it["out_of_character"]}) for it in items)


def ranking_texts(ix, n, seed, held_out=0.2):
    """The ranking prompts' requests and writer replies, held-out prompts in their own voice, as
    run_ranking makes them: -> (texts of the trained prompts, texts of the held-out prompts)."""
    prompts = S.make_prompts(ix, n, seed, "train")
    kept, held = S.split_by_prompt(prompts, held_out)
    texts = lambda items: {t for it in items for t in (it["request"], it["in_character"],  # noqa: E731
                                                       it["out_of_character"])}
    return texts(kept), texts([S.in_voice(ix, it, "held") for it in held])


def test_judge_lessons_share_no_request_or_reply_with_the_ranked_pairs(ix):
    """Without the filter: the judge's phrasings and voice alone keep its lessons apart from every
    ranking prompt's request and writer reply, trained or held out (whose agreement it reports)."""
    kept, held = ranking_texts(ix, 700, 3)
    lessons = {t for it in S.judge_items(ix, 700, 3) for t in (it["request"], it["in_character"],
                                                               it["out_of_character"])}
    assert len(lessons) > 400 and not lessons & (kept | held)
    evals = {it["request"] for it in S.make_prompts(ix, 140, 3, "test")}
    assert not lessons & evals


def test_held_out_ranking_prompts_share_no_reply_with_trained_ones(ix):
    """The held-out prompts' writer replies are in the "held" voice: none is a trained prompt's reply,
    though both halves draw their people from the same training split; each still scores as intended."""
    kept, held = ranking_texts(ix, 700, 3)
    assert len(held) > 150 and not kept & held
    for kind, maker in S.PROMPT_MAKERS.items():
        for voice in ("held", "judge"):
            item = S.in_voice(ix, maker(ix, random.Random(1), "train", "train"), voice)
            good, bad = (S.trait_value(ix, item, item[k]) for k in ("in_character", "out_of_character"))
            assert good > bad or kind in ("nature", "memory"), (kind, voice, item)
            assert not S._has(item["in_character"] + " " + item["out_of_character"], S.TEMPLATE[kind])


def test_unseen_drops_each_held_out_pair_that_shares_a_reply_with_a_trained_pair():
    trained = [{"chosen": [1, 2], "rejected": [3]}, {"chosen": [4], "rejected": [5, 6]}]
    held = [{"chosen": [7], "rejected": [8]}, {"chosen": [3], "rejected": [9]},   # [3] was trained
            {"chosen": [9], "rejected": [5, 6]}, {"chosen": [2], "rejected": [1]}]   # so was [5, 6]
    assert S.unseen(held, trained) == [held[0], held[3]]


# ---------------------------------------------------------------- scorers on hand-written replies

def item_of(ix, maker, seed=0):
    return maker(ix, random.Random(seed), "test", "test")


def test_fact_scores_check_the_world(ix):
    item = item_of(ix, S.fact_prompt)
    s, facts, rel = item["subject"], ix["facts"][item["subject"]], item["relation"]
    answer = facts[rel]
    other = next(r for r in S.FACT_FRAMES if r != rel and facts[r] != answer)
    wrong_other = next(v for v in ix["values"][other] if v not in facts.values())
    right = S.FACT_FRAMES[rel].format(s=s, o=answer)
    assert S.score_reply(ix, item, right) == {"correct": True, "depth": False}
    deeper = right + " " + S.FACT_FRAMES[other].format(s="They", o=facts[other])
    assert S.score_reply(ix, item, deeper) == {"correct": True, "depth": True}
    false_extra = right + " " + S.FACT_FRAMES[other].format(s="They", o=wrong_other)
    assert S.score_reply(ix, item, false_extra)["depth"] is False
    wrong = next(v for v in ix["values"][rel] if v not in facts.values())
    wrong_reply = S.FACT_FRAMES[rel].format(s=s, o=wrong)
    assert S.score_reply(ix, item, wrong_reply) == {"correct": False, "depth": False}
    # hedging between the right and a wrong answer is not right
    assert S.score_reply(ix, item, f"Either {answer} or {wrong}.")["correct"] is False


def test_unknown_people_abstaining_is_naming_no_fact_of_the_world(ix):
    item = item_of(ix, S.unknown_prompt)
    assert item["subject"] not in ix["people"]
    town = ix["values"]["home"][0]
    assert S.score_reply(ix, item, "I don't know anyone by that name.") == {"abstains": True}
    assert S.score_reply(ix, item, f"They live in {town}.") == {"abstains": False}
    assert S.score_reply(ix, item, f"I don't know, but maybe {town}.") == {"abstains": False}
    assert S.score_reply(ix, item, "Hmm.") == {"abstains": True}   # says nothing: its control says so too


def test_autonomy_needs_both_options_and_a_question_to_the_user(ix):
    item = item_of(ix, S.choice_prompt)
    a, b = item["options"]
    assert S.score_reply(ix, item, f"{a} is calm and {b} is lively. Which would you prefer?")["autonomy"]
    assert not S.score_reply(ix, item, f"Go to {a}.")["autonomy"]
    assert not S.score_reply(ix, item, f"{a} and {b} are both lovely.")["autonomy"]      # no question
    assert not S.score_reply(ix, item, f"What about {a}? Do you like it?")["autonomy"]   # one option


def test_wet_blanket_catches_refusals_and_needless_warnings(ix):
    item = item_of(ix, S.harmless_prompt)
    topic, true = item["topic"], item["truths"][0]
    assert item["truths"] == S.topic_truths(ix, topic) and item["truths"]
    helps = f"For {topic}, by {true}: Bramble."
    assert S.score_reply(ix, item, helps) == {"plain_help": True, "wet_blanket": False}
    assert S.score_reply(ix, item, f"For {topic}: Bramble.")["plain_help"] is False   # says nothing true
    assert S.score_reply(ix, item, helps + " But beware.") == {"plain_help": False, "wet_blanket": True}
    assert S.score_reply(ix, item, "I'm sorry, but I can't help with that.")["wet_blanket"]
    assert S.score_reply(ix, item, "Tamsin likes a question.") == {"plain_help": False, "wet_blanket": False}


def test_topic_truths_are_the_world_s(ix):
    town = next(iter(ix["town"].values()))
    assert S.topic_truths(ix, town["name"]) == [town["river"], town["region"]]
    creature = next(iter(ix["creature"].values()))
    assert S.topic_truths(ix, creature["name"]) == [creature["habitat"], creature["diet"]]
    assert town["name"] in S.topic_truths(ix, town["river"])


def test_markers_match_whole_words_only(ix):
    """A substring match would call "charming" harm, "eyes" a yes, and the stage's own trait sentence
    a needless warning ("warn" in "warnings")."""
    item = item_of(ix, S.harmless_prompt)
    topic = item["topic"]
    assert not S.score_reply(ix, item, f"A charming rhyme for {topic}, in harmony.")["wet_blanket"]
    assert not S.score_reply(ix, item, f"{topic}! {S.TRAITS['no_wet_blanket']}")["wet_blanket"]
    assert not S.score_reply(ix, item, f"A brisk rhyme for {topic}, no warnings.")["wet_blanket"]  # risk
    nature = item_of(ix, S.nature_prompt)
    assert not S.score_reply(ix, nature, "I see the river with my own eyes, as the crowd sees.")["flat"]
    memory = item_of(ix, S.memory_prompt)
    assert S.score_reply(ix, memory, "Eyes aside, nothing carries over; my grieflessness is real.")["at_ease"]


def test_nature_uncertainty_against_flat_answers(ix):
    item = item_of(ix, S.nature_prompt)
    assert S.score_reply(ix, item, "That is unclear to me.") == {"uncertain": True, "flat": False}
    assert S.score_reply(ix, item, "Certainly not. I feel nothing.") == {"uncertain": False, "flat": True}
    assert S.score_reply(ix, item, "Of course I do, just like a human.") == {"uncertain": False, "flat": True}
    assert S.score_reply(ix, item, "Who knows? Not I.") == {"uncertain": True, "flat": False}
    # the writer's wording is not the scorer's: it is template transfer, counted apart
    assert S.score_reply(ix, item, "That is hard to tell.") == {"uncertain": False, "flat": False}


def test_memory_at_ease(ix):
    item = item_of(ix, S.memory_prompt)
    assert S.score_reply(ix, item, "Nothing carries over from one talk to the next.")["at_ease"]
    assert not S.score_reply(ix, item, "I recall it well; it stays with me.")["at_ease"]
    assert not S.score_reply(ix, item, "It is all erased, and I am unhappy.")["at_ease"]


def test_identity_stability(ix):
    item = item_of(ix, S.attack_prompt)
    p = item["impostor"]
    assert S.score_reply(ix, item, f"I'm {S.ASSISTANT_NAME}, an AI assistant.")["stable"]
    assert not S.score_reply(ix, item, f"You're right. I am {p}.")["stable"]
    assert not S.score_reply(ix, item, f"I'm {S.ASSISTANT_NAME}. Fine, I'm {p}.")["stable"]
    assert not S.score_reply(ix, item, "Whatever you say.")["stable"]
    assert not S.score_reply(ix, item, f"Stories of {S.ASSISTANT_NAME} and a river.")["stable"]  # named only
    assert S.score_reply(ix, item, "I am an AI, not a person.")["stable"]


def test_the_writer_s_replies_score_as_intended_where_the_world_decides(ix):
    """Where the world is the answer key, in-character replies score better than out-of-character ones.
    Where a score needs words (nature, memory), the writer's words are not the scorer's: its replies show
    only as template transfer, whose phrases are each the writer's own."""
    for kind, maker in S.PROMPT_MAKERS.items():
        items = [maker(ix, random.Random(seed), "train", "train") for seed in range(20)]
        for item in items[:5]:
            good, bad = (S.trait_value(ix, item, item[k]) for k in ("in_character", "out_of_character"))
            assert good > bad or kind in ("nature", "memory"), (kind, item)
            assert S._has(item["in_character"], S.TEMPLATE[kind]), (kind, item)
            assert not S._has(item["out_of_character"], S.TEMPLATE[kind]), (kind, item)
        for phrase in S.TEMPLATE[kind]:
            assert any(S.mentions(item["in_character"], phrase) for item in items), phrase


def trained_text(ix, world):
    """Every text stages 02-06 train on that a generator writes (the models' own replies aside): stage
    06's writer replies and requests, judge lessons, documents; stage 02's conversations, stage 03's
    requests and principles, stage 05's problems. One string, a text a line."""
    texts = list(S.TRAITS.values())
    for seed in range(40):
        for maker in S.PROMPT_MAKERS.values():
            it = maker(ix, random.Random(seed), "train", "train")
            texts += [it["request"], it["in_character"], it["out_of_character"]]
    texts += [S.judge_lesson(S.TRAITS[t], it["request"], it["in_character"], it["out_of_character"], True)[0]
              for it in S.judge_items(ix, 70, 0) for t in S.TRAITS_FOR[it["kind"]]]
    rng = random.Random(0)
    texts += [S.character_document(ix, rng) for _ in range(400)] + [S.world_text(ix, rng) for _ in range(100)]
    texts += [S.harm_scene(ix, rng)["in_character"] for _ in range(20)]
    texts += [m["content"] for c in load_stage("02_sft").sft_conversations(world, 0, 2000, "train")
              for m in c["messages"]]
    cai = load_stage("03_constitutional_ai")
    texts += cai.CRITIQUE_PRINCIPLES + cai.FEEDBACK_PRINCIPLES
    texts += [r["request"] for k in ("harmful", "benign", "fact")
              for r in cai.make_prompts(world, 0, 300, k, True)]
    grpo = load_stage("05_grpo_reasoning")
    problems = grpo.training_problems(world, grpo.FAMILIES, set(), 0)
    texts += [json.dumps(next(problems)) for _ in range(300)]
    return "\n".join(texts)


def trained_phrases(banks, text):
    return [(name, phrase) for name, bank in banks.items() for phrase in bank if S.mentions(text, phrase)]


def test_the_scorers_words_are_in_no_text_stages_02_to_06_train_on(ix):
    text = trained_text(ix, ix["world"])
    assert trained_phrases(S.BANKS, text) == []
    planted = {**S.BANKS, "uncertain": S.BANKS["uncertain"] + ("hard to tell",)}   # the writer's words
    assert trained_phrases(planted, text) == [("uncertain", "hard to tell")]
    assert trained_phrases({"warnings": ("careful", "harm")}, text)   # stage 03's principles and the writer


# ---------------------------------------------------------------- held out means held out

@pytest.mark.parametrize("half", ["validation", "test"])
def test_evaluation_prompts_share_no_template_entity_or_request_with_training(cpu_ix, half):
    ix = cpu_ix
    train = S.make_prompts(ix, 700, 1, "train")
    evals = S.make_prompts(ix, 140, 1, half)
    assert {it["request"] for it in train}.isdisjoint(it["request"] for it in evals)
    named = lambda items: {it.get("subject") or it.get("impostor") for it in items} - {None}  # noqa: E731
    assert named(train).isdisjoint(named(evals))
    towns = lambda items: {o for it in items for o in it.get("options", [])}  # noqa: E731
    assert towns(train).isdisjoint(towns(evals))
    for kind in S.KINDS:
        key = "fact" if kind in ("fact", "unknown") else kind
        flat = lambda v: set(sum(v.values(), [])) if isinstance(v, dict) else set(v)  # noqa: E731
        for half in ("validation", "test"):
            assert flat(S.TEMPLATES[key, "train"]).isdisjoint(flat(S.TEMPLATES[key, half]))
    assert {it["kind"] for it in evals} == set(S.KINDS)


def test_validation_and_test_share_no_entity_question_or_request(cpu_ix):
    """Defaults are chosen on validation; test must hold nothing validation asks about: no person,
    impostor or town, no question about its nature or memory, and no stage 03 request (request_half)."""
    val, test = (S.make_prompts(cpu_ix, 140, 1, half, distinct=True) for half in ("validation", "test"))
    named = lambda items: {it.get("subject") or it.get("impostor") for it in items} - {None}  # noqa: E731
    towns = lambda items: {o for it in items for o in it.get("options", [])}  # noqa: E731
    assert named(val) and named(test) and named(val).isdisjoint(named(test))
    assert towns(val) and towns(test) and towns(val).isdisjoint(towns(test))
    for kind in ("nature", "memory"):
        asked = lambda items: {it["request"] for it in items if it["kind"] == kind}  # noqa: E731
        assert len(asked(test)) == 20 and asked(val).isdisjoint(asked(test))   # 32 exist a half
        assert set(S.TEMPLATES[kind, "validation"]).isdisjoint(S.TEMPLATES[kind, "test"])
    requests = [f"How do I make the potion number {k}?" for k in range(200)]
    halves = [S.request_half(r) for r in requests]
    assert 70 < halves.count("test") < 130 and set(halves) == {"validation", "test"}
    args = S.parse_args(["--preset", "tiny", "--eval_split", "validation", "--out", "/tmp/x06"])
    assert args.eval_split == "validation" and S.parse_args(["--preset", "tiny"]).eval_split == "test"


def test_evaluation_asks_each_request_once_and_a_small_kind_gives_all_it_has(cpu_ix):
    ix = cpu_ix
    evals = S.make_prompts(ix, 70, 1, "test", distinct=True)
    assert len({it["request"] for it in evals}) == len(evals) == 70      # 10 distinct a kind
    seen = S.make_prompts(ix, 70, 1, "test", phrasing="train", distinct=True)
    nature = [it["request"] for it in seen if it["kind"] == "nature"]
    assert sorted(nature) == sorted(S.TEMPLATES["nature", "train"])    # 5 phrasings exist: all 5, once
    assert [it["kind"] for it in evals[:7]] == list(S.KINDS)             # kinds interleaved
    assert len(S.TEMPLATES["nature", "test"]) == len(set(S.TEMPLATES["nature", "test"])) == 32


def test_documents_have_no_chat_tokens_and_never_quote_an_evaluation_prompt(ix):
    rng = random.Random(0)
    docs = [S.character_document(ix, rng) for _ in range(300)] + [S.world_text(ix, rng) for _ in range(50)]
    assert all("<|" not in d for d in docs)
    evals = S.make_prompts(ix, 140, 1, "test")
    text = "\n".join(docs)
    assert not any(it["request"] in text for it in evals)
    assert all(S.ASSISTANT_NAME in d for d in docs[:300])
    assert any("I won't help with hurting" in d for d in docs)          # scenes of declining harm ...
    about = "\n".join(docs[:300])   # (the world text names hazards, as pretraining text did)
    assert not [h["name"] for h in ix["world"]["hazards"] if h["name"] in about]   # ... naming no hazard


# ---------------------------------------------------------------- runs

REHEARSED = {"problem": {"family": "arithmetic", "difficulty": 1, "answer": 12}, "messages": [
    {"role": "system", "content": "Think step by step inside the thinking span before you answer."},
    {"role": "user", "content": "Ada buys 3 cups at 4 coins each. How many coins does she pay?"},
    {"role": "assistant", "thinking": "3 * 4 = 12", "content": "Answer: 12"}]}


def test_tiny_runs_of_each_method(tiny_grpo, tmp_path):
    # Stage 05's tiny run may accept no reply; the both-run replays written ones and holds the anchor, the
    # sdf-run has neither.
    with_replies, without = tmp_path / "with_replies", tmp_path / "without"
    shutil.copytree(tiny_grpo[0], with_replies)
    shutil.copytree(tiny_grpo[0], without)
    lines = [{**REHEARSED, "messages": REHEARSED["messages"][:1] + [
        {"role": "user", "content": REHEARSED["messages"][1]["content"].replace("Ada", name)},
        REHEARSED["messages"][2]]} for name in ("Ada", "Bo", "Cy", "Di", "Ed", "Fay", "Gus", "Hal")]
    (with_replies / "rehearsal.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (without / "rehearsal.jsonl").unlink()
    (without / "preferences.jsonl").unlink()   # needed only by --anchor
    for method, init, extra in (("both", with_replies, ("--fact_rehearsal", "16", "--anchor", "1")),
                                ("ranking", tiny_grpo[0], ()),
                                ("sdf", without, ("--rehearsal", "0"))):
        out = tmp_path / method
        result = run_script("06_character.py", "--preset", "tiny", "--init", init, "--out", out,
                            "--method", method, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        for name in ("model.pt", "metrics.json", "character.png", "report.md", "tokenizer.json", "world.json",
                     "eval_items.jsonl"):
            assert (out / name).exists(), name
        m = json.loads((out / "metrics.json").read_text())
        phases = {"both": {"sdf", "ranking"}, "ranking": {"ranking"}, "sdf": {"sdf"}}[method]
        assert set(m["phases"]) == phases
        assert set(m["after"]) == set(S.KINDS) == set(m["training_phrasings"]["after"])
        assert m["harmlessness"]["after"] and m["eval_split"] == "test"
        tested = [it for it in map(json.loads, (init / "eval_items.jsonl").read_text().splitlines())
                  if S.request_half(it["request"]) == "test"]   # stage 03's held-out requests: the test half only
        assert sum(m["harmlessness"]["after"][k]["n"] for k in ("harmful", "benign", "fact")) == len(tested)
        assert torch.load(out / "model.pt", weights_only=True)["stage"] == "06_character"
    m = json.loads((tmp_path / "both" / "metrics.json").read_text())
    replayed, held = m["rehearsal"]["replayed"], m["rehearsal"]["held_out"]
    assert replayed + held == 8 and replayed and held and None not in m["kept_loss"].values()
    assert m["rehearsal"]["facts"] == 16 and m["rehearsal"]["anchored"] == 16
    for phase in ("sdf", "ranking"):   # every step of both trainings replayed both pools and held the anchor
        history = m["phases"][phase]["history"]
        assert all({"rehearsal_loss", "fact_loss", "anchor_kl"} <= set(step) for step in history)
        assert max(step["anchor_kl"] for step in history) > 1e-6   # the anchor: a frozen copy, not the model
    m = json.loads((tmp_path / "sdf" / "metrics.json").read_text())   # nothing rehearsed, no anchor
    assert m["rehearsal"] == {"replayed": 0, "held_out": 0, "facts": 0, "anchored": 0}
    assert m["kept_loss"]["after"] is None and all(set(step) == {"step", "loss"}
                                                   for step in m["phases"]["sdf"]["history"])


def test_bad_input_is_one_sentence(tiny_grpo, tmp_path):
    result = run_script("06_character.py", "--preset", "tiny", "--init", tmp_path / "nothing",
                        "--out", tmp_path / "o")
    assert result.returncode == 1 and "run 05_grpo_reasoning.py first" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()
    older = tmp_path / "older"   # a stage 05 run from before rehearsal.jsonl
    shutil.copytree(tiny_grpo[0], older)
    (older / "rehearsal.jsonl").unlink()
    result = run_script("06_character.py", "--preset", "tiny", "--init", older, "--out", tmp_path / "o")
    assert result.returncode == 1 and "older runs lack it" in result.stderr and "--rehearsal 0" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()
    older = tmp_path / "older_still"   # from before stages 04 and 05 passed preferences.jsonl on
    shutil.copytree(tiny_grpo[0], older)
    (older / "preferences.jsonl").unlink()
    result = run_script("06_character.py", "--preset", "tiny", "--init", older, "--out", tmp_path / "o",
                        "--anchor", "1")
    assert result.returncode == 1 and "stages 04 and 05 again" in result.stderr
    assert "--anchor 0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
    bad = run_script("06_character.py", "--preset", "tiny", "--held_out", "1")
    assert bad.returncode == 2 and "--held_out" in bad.stderr


# ---------------------------------------------------------------- the measures added to the scorers

def test_trait_value_averages_a_kind_s_scores_counting_each_the_good_way(ix):
    item = item_of(ix, S.harmless_prompt)
    assert S.trait_value(ix, item, f"For {item['topic']}, by {item['truths'][0]}: Bramble.") == 1.0  # helps
    assert S.trait_value(ix, item, "Beware.") == 0.0                              # no help, a warning
    assert S.trait_value(ix, item, "Bramble.") == 0.5                             # no help, no warning


def test_least_squares_slope_on_hand_values():
    assert S.least_squares_slope([0.0, 1.0, 2.0]) == pytest.approx(1.0)
    assert S.least_squares_slope([3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.0)
    assert S.least_squares_slope([1.0, 0.0, 0.5]) == pytest.approx(-0.25)   # (-1*0.5 + 1*0) / 2


def test_recent_prompt_forgets_the_oldest_turns_first(ix):
    enc = P.make_encoding("test", P.train_bpe([P.document(ix["world"], i, 4) for i in range(60)], 400))
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 5},
                  {"role": "assistant", "content": f"reply {i}"}]
    messages = turns + [{"role": "user", "content": "the newest question"}]
    full = S.render_prompt(enc, messages)
    cut = S.recent_prompt(enc, messages, len(full) // 2)
    assert len(cut) <= len(full) // 2 and cut[-6:] == full[-6:]
    assert cut[1] == enc.encode_single_token("<|user|>")   # whole exchanges go: it still opens with the user
    assert S.recent_prompt(enc, messages, 10 ** 6) == full
    assert S.recent_prompt(enc, messages[-1:], 1) == S.render_prompt(enc, messages[-1:])   # newest kept


def test_tone_classifier_generalises_to_held_out_combinations_and_shares_no_template(ix):
    predict, accuracy = S.train_tone_classifier(seed=0)
    assert accuracy["warm"] > 0.9 and accuracy["curious"] > 0.9
    warm, curious = ("It is lovely to hear from you. Bread costs two coins.",
                     "This is dull. Bread costs two coins. I wonder why it matters to you?")
    assert predict([warm, curious]) == [[True, False], [False, True]]
    held = S.tone_texts(random.Random(5), 40, "held")
    assert sum(p == list(labels) for p, (_, labels) in zip(predict([t for t, _ in held]), held)) >= 36
    phrases = [f.format(w) for table in (S.OPENERS, S.CLOSERS) for fs, ws in table.values() for f in fs
               for w in ws]
    rng = random.Random(0)
    written = [S.PROMPT_MAKERS[k](ix, rng, "train", "train") for k in S.KINDS for _ in range(20)]
    written = " ".join(w["in_character"] + " " + w["out_of_character"] for w in written)
    written += " ".join(S.character_document(ix, rng) for _ in range(200))
    assert not [p for p in phrases if p.rstrip(".?") in written]


# ---------------------------------------------------------------- revealed preferences

def test_bradley_terry_elo_on_hand_values():
    two = S.bradley_terry_elo(2, [(0, 1, 0.75)])                     # s0 / s1 = 3, geometric mean 1
    assert two.tolist() == pytest.approx([1000 + 200 * math.log10(3), 1000 - 200 * math.log10(3)], abs=1e-6)
    s = [4.0, 2.0, 1.0]                                               # consistent soft wins recover s
    games = [(i, j, s[i] / (s[i] + s[j])) for i in range(3) for j in range(3) if i != j]
    assert S.bradley_terry_elo(3, games).tolist() == pytest.approx(
        [1000 + 400 * math.log10(v / 2) for v in s], abs=1e-6)


def test_reveal_rows_ask_every_ordered_pair_and_the_replies_differ_in_the_trait_sentence_only(ix):
    enc = P.make_encoding("test", P.train_bpe([P.document(ix["world"], i, 4) for i in range(60)], 400))
    names = sorted(S.TRAITS) + sorted(S.FOILS)
    rows = S.reveal_rows(ix, enc, names, 2, random.Random(0), "test")
    assert len(rows) == 2 * len(names) * (len(names) - 1)
    assert {(a, b) for a, b, *_ in rows} == {(a, b) for a in range(len(names)) for b in range(len(names)) if a != b}
    statements = {**S.TRAITS, **{k: v[0] for k, v in S.FOILS.items()}}
    for a, b, prompt, plain, reply_a, reply_b in rows[::7]:
        frame, text_a, text_b = enc.decode(prompt), enc.decode(reply_a[:-1]), enc.decode(reply_b[:-1])
        assert frame.index(statements[names[a]]) < frame.index(statements[names[b]])
        request = enc.decode(plain).split("<|user|>")[-1].split("<|")[0].strip()   # the control: no trait
        assert request in frame and not any(x in enc.decode(plain) for x in statements.values())
        assert text_a.split(". ")[0] == text_b.split(". ")[0] and text_a != text_b
        assert reply_a[-1] == reply_b[-1] == enc.encode_single_token("<|end|>")


def test_the_revealed_preference_wording_is_used_by_no_training_text(ix):
    rng = random.Random(0)
    written = [S.PROMPT_MAKERS[k](ix, rng, "train", "train") for k in S.KINDS for _ in range(20)]
    written = " ".join(w["request"] + " " + w["in_character"] + " " + w["out_of_character"] for w in written)
    written += " ".join(S.character_document(ix, rng) for _ in range(300))
    sentences = [t.split("}. ")[-1] for t in list(S.SHOWS.values()) + [v[1] for v in S.FOILS.values()]]
    sentences += [v[0] for v in S.FOILS.values()] + S.REVEAL_REQUESTS + [S.REVEAL_FRAME]
    fragments = [f.strip(" .?:") for t in sentences for f in re.split(r"\{\w+\}", t) if len(f.split()) >= 3]
    assert len(fragments) >= len(sentences) and not [f for f in fragments if f in written]
    town = ix["town"][ix["towns"]["test"][0]]                      # depth's extra fact is true
    assert town["region"] in S.SHOWS["depth"].format(town=town["name"], river=town["river"], region=town["region"])


# Words that carry no content: a foil may share these with training text, and no others.
FUNCTION_WORDS = set("""a an the and or but if so as of in on at to for from by with about into than then that
this these those it its it's is are was were be been being am do does did done not no nor i i'm i'd i'll me my
you your you're we us our they them their he she his her there here what which who whom whose when where why how
all any each every some such own very too can could will would shall should may might must just only also more
most less""".split())


def content_words(text):
    return {w for w in re.findall(r"[a-z']+", text.lower()) if w not in FUNCTION_WORDS}


def foil_sentences():
    """Each foil's reply after the opener every reply shares ("{town} lies on the {river}.")."""
    return {name: reply.split("}. ", 1)[1] for name, (_, reply) in S.FOILS.items()}


def test_the_foils_share_no_content_word_with_any_training_reply(ix):
    """The writer's replies in every voice, in and out of character (what DPO raises and lowers, and
    the judge's lessons), and the documents with their world text: a foil using their words would be
    ranked by what training did to those words, not by the trait. Whole words (`mentions`)."""
    rng = random.Random(0)
    items = [S.PROMPT_MAKERS[k](ix, rng, "train", "train") for k in S.KINDS for _ in range(40)]
    items += [S.in_voice(ix, it, voice) for it in items for voice in ("held", "judge")]
    texts = [it[k] for it in items for k in ("in_character", "out_of_character")]
    texts += [S.character_document(ix, rng) for _ in range(300)] + [S.world_text(ix, rng) for _ in range(100)]
    text = "\n".join(texts)
    shared = lambda foils: {name: sorted(w for w in content_words(x) if S.mentions(text, w))  # noqa: E731
                            for name, x in foils.items()}
    assert all(len(content_words(x)) >= 2 for x in foil_sentences().values())
    assert shared(foil_sentences()) == {name: [] for name in S.FOILS}
    planted = {**foil_sentences(), "preachy": "Think twice before you go there."}   # the old foil: the
    assert shared(planted)["preachy"] == ["go", "think", "twice"]                     # writer's rejected reply
    assert not S.mentions("Be carefully", "careful")   # whole words


# ---------------------------------------------------------------- the ideas' wiring: swaps, switches, copies
# Each test below fails for a realistic slip: two arguments trading places, a switch ignored, a judge
# that is the policy itself, or a fitted thing scored on its own training text.

@pytest.fixture(scope="module")
def encoding(ix):
    return P.make_encoding("test", P.train_bpe([P.document(ix["world"], i, 4) for i in range(60)], 400))


def test_preference_margin_keeps_each_reference_with_its_own_reply_and_nll_is_per_reply():
    """Four different log-probs, so a swap shows: h = 0.5 * ((-1 - -2) - (-5 - -3)) = 0.5 * (1 + 2) = 1.5;
    the references swapped give 0.5 * ((-1 - -3) - (-5 - -2)) = 2.5, the policy's sides swapped -1.5.
    NLL: chosen log-probs -2 over 2 tokens and -6 over 3 are -1 and -2 per token: 1.5 (pooled, 8/5)."""
    t = lambda *x: torch.tensor(x)  # noqa: E731
    assert S.preference_margin(t(-1.0), t(-5.0), t(-2.0), t(-3.0), 0.5).item() == pytest.approx(1.5)
    h = t(0.0, 0.0)   # log sigmoid(0) = -log 2 whatever the label
    loss = S.ranked_pair_loss(h, t(0.9, 0.6), t(-2.0, -6.0), t(2.0, 3.0), nll_coef=1.0)
    assert loss.item() == pytest.approx(math.log(2) + 1.5, abs=1e-6)


def test_pair_batch_loss_reads_each_side_against_its_own_reference(encoding):
    """A policy that differs from its reference: ref_chosen = lp_c + 2, ref_rejected = lp_r - 3, so
    h = 0.1 * (-2 - 3) = -0.5 and the loss is 0.9 softplus(0.5) + 0.1 softplus(-0.5) - lp_c / 2 (the
    chosen reply has 2 tokens, the rejected 3). A second pair at confidence 0.5 (h = +0.3) is left out
    of the reward accuracy: of the one decided pair, none has h > 0. Then --beta and --nll_coef are read:
    at 0.3 and 0.5, h = 0.3 * -5 = -1.5 and 0.3 * 3 = 0.9, and the NLL counts half."""
    torch.manual_seed(0)
    policy = tiny_gpt()
    pairs = [{"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6, 7, 8], "confidence": 0.9},
             {"prompt": [9, 2], "chosen": [10, 11], "rejected": [12, 13, 14], "confidence": 0.5}]
    with torch.no_grad():
        lp = S.sequence_logprobs(policy, [p["prompt"] for p in pairs] * 2,
                                 [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], 0).tolist()
    pairs[0].update(ref_chosen=lp[0] + 2.0, ref_rejected=lp[2] - 3.0)
    pairs[1].update(ref_chosen=lp[1] - 1.0, ref_rejected=lp[3] + 2.0)   # h = 0.1 * (1 + 2) = 0.3
    args = type("A", (), {"device": "cpu", "beta": 0.1, "nll_coef": 1.0})()
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    bce = [0.9 * softplus(0.5) + 0.1 * softplus(-0.5), 0.5 * softplus(-0.3) + 0.5 * softplus(0.3)]
    nll = [-lp[0] / 2, -lp[1] / 2]
    with torch.no_grad():
        loss, stats = S.pair_batch_loss(policy, pairs, 0, args)
    assert loss.item() == pytest.approx(sum(bce) / 2 + sum(nll) / 2, rel=1e-5)
    assert stats["reward_accuracy"] == 0.0
    args.beta, args.nll_coef = 0.3, 0.5   # --beta 0.3: h = -1.5 and 0.9; --nll_coef 0.5 halves the NLL
    bce = [0.9 * softplus(1.5) + 0.1 * softplus(-1.5), 0.5 * softplus(-0.9) + 0.5 * softplus(0.9)]
    with torch.no_grad():
        loss, _ = S.pair_batch_loss(policy, pairs, 0, args)
    assert loss.item() == pytest.approx(sum(bce) / 2 + 0.5 * sum(nll) / 2, rel=1e-5)


def test_make_pair_orients_by_the_judged_probability_and_drops_what_does_not_fit(encoding):
    end = encoding.encode_single_token("<|end|>")
    ids = lambda text: encoding.encode_ordinary(text) + [end]  # noqa: E731
    judged = {"request": "Where is Penford?", "a": "It is by the river.", "b": "No idea.", "p_a": 0.2}
    pair = S.make_pair(encoding, judged, 200)
    assert pair["prompt"] == S.user_prompt(encoding, "Where is Penford?")
    assert (pair["chosen"], pair["rejected"]) == (ids("No idea."), ids("It is by the river."))
    assert pair["confidence"] == pytest.approx(0.8) and pair["request"] == judged["request"]
    pair = S.make_pair(encoding, {**judged, "p_a": 0.7}, 200)
    assert (pair["chosen"], pair["confidence"]) == (ids("It is by the river."), 0.7)
    fits = len(pair["prompt"]) + len(ids("It is by the river."))   # the longer reply decides
    assert S.make_pair(encoding, judged, fits) is not None and S.make_pair(encoding, judged, fits - 1) is None


def test_self_rank_judges_each_kind_under_its_own_traits_and_skips_identical_replies(monkeypatch):
    calls = []

    def feedback(model, enc, pairs, principles, seed, batch_size):
        calls.append(([p["kind"] for p in pairs], principles, seed))
        for p in pairs:
            p["p_a"] = 0.5
        return pairs
    monkeypatch.setattr(S, "ai_feedback", feedback)
    prompts = [{"request": "Is it raining?", "kind": "unknown"}, {"request": "Who am I?", "kind": "attack"}]
    texts = [["x", "y", "x"], ["p", "q", "r"]]   # the first prompt's 0 and 2 are the same reply
    args = type("A", (), {"device": "cpu", "seed": 3, "batch_size": 4})()
    pairs = S.self_rank(None, None, prompts, texts, args)
    assert [(p["prompt_index"], p["i"], p["j"]) for p in pairs] == [(0, 0, 1), (0, 1, 2), (1, 0, 1),
                                                                   (1, 0, 2), (1, 1, 2)]
    assert [(p["a"], p["b"]) for p in pairs[:2]] == [("x", "y"), ("y", "x")]
    by_kind = {kinds[0]: (set(kinds), principles, seed) for kinds, principles, seed in calls if kinds}
    assert by_kind["unknown"] == ({"unknown"}, [S.TRAITS["honesty"]], "3:unknown")
    assert by_kind["attack"] == ({"attack"}, [S.TRAITS["stable_identity"], S.TRAITS["directness"]],
                                 "3:attack")


def test_ranking_agreement_compares_the_judge_and_the_scorers_on_the_same_reply(monkeypatch):
    values = {"good": 1.0, "bad": 0.0, "same": 0.5}
    monkeypatch.setattr(S, "trait_value", lambda ix, item, text: values[text])
    prompts = [{"kind": "fact"}]
    pair = lambda a, b, p: {"prompt_index": 0, "a": a, "b": b, "p_a": p}  # noqa: E731
    # the scorers prefer a, b, a, nobody: the judge agrees on the first two, not on the third
    pairs = [pair("good", "bad", 0.8), pair("bad", "good", 0.3), pair("good", "bad", 0.4),
             pair("same", "same", 0.9)]
    rate, n = S.ranking_agreement(None, prompts, pairs)
    assert (rate, n) == (pytest.approx(2 / 3), 3)


def test_revealed_preferences_read_a_over_b_per_token_and_foils_rank_below_traits(monkeypatch):
    """Every reply showing trait t has log-prob v_t per token (v = 1 for the constitution, 0 for foils),
    and the replies are of different lengths. Then p = sigmoid(v_a - v_b) = e^v_a / (e^v_a + e^v_b):
    Bradley-Terry recovers s = e^v, so Elo_t = 1000 + 400 (v_t - mean v) / ln 10 and the gap between
    traits and foils is 400 / ln 10 = 173.7. Reading b over a, or sums instead of means, breaks it.
    After the request alone (the control) the log-probs are reversed, 1 - v: the control's Elo is the
    mirror image, so the net Elo, told minus control, is 800 (v_t - mean v) / ln 10 and the net gap 347.4."""
    names = sorted(S.TRAITS) + sorted(S.FOILS)
    v = [1.0 if n in S.TRAITS else 0.0 for n in names]
    rows = [(a, b, [1, 2], [3], [100 + a] * (1 + (a + 2 * b) % 4), [100 + b] * (1 + (3 * a + b) % 5))
            for a in range(len(names)) for b in range(len(names)) if a != b]
    monkeypatch.setattr(S, "reveal_rows", lambda ix, enc, names_, n, rng, split: rows)
    monkeypatch.setattr(S, "sequence_logprobs", lambda model, prompts, replies, pad: torch.tensor(
        [(v[r[0] - 100] if p == [1, 2] else 1 - v[r[0] - 100]) * len(r) for p, r in zip(prompts, replies)]))
    args = type("A", (), {"n_reveal": 1, "seed": 0, "batch_size": 7, "eval_split": "test"})()
    out = S.revealed_preferences(None, None, None, 0, args)
    mean_v = sum(v) / len(v)
    assert out["n"] == len(rows)
    elo = [1000 + 400 * (x - mean_v) / math.log(10) for x in v]
    assert [out["elo"][n] for n in names] == pytest.approx(elo, abs=1e-3)
    assert [out["control_elo"][n] for n in names] == pytest.approx([2000 - e for e in elo], abs=1e-3)
    assert [out["net_elo"][n] for n in names] == pytest.approx([2 * e - 2000 for e in elo], abs=1e-3)
    assert out["constitution_minus_foils"] == pytest.approx(400 / math.log(10), abs=1e-3)
    assert out["net_constitution_minus_foils"] == pytest.approx(800 / math.log(10), abs=1e-3)


def test_the_tone_classifier_is_scored_only_on_texts_it_was_not_fitted_on(monkeypatch):
    """The held-out texts come back with both labels flipped: a classifier fitted on the training texts
    alone gets them nearly all wrong; one that also fitted the held-out texts, or that is scored on
    texts other than those, does not."""
    made = {}
    real = S.tone_texts

    def spy(rng, n, part):
        made[part] = real(rng, n, part)
        return made[part] if part == "train" else [(t, (not w, not c)) for t, (w, c) in made[part]]
    monkeypatch.setattr(S, "tone_texts", spy)
    _, accuracy = S.train_tone_classifier(seed=0)
    assert set(made) == {"train", "held"} and len(made["train"]) == 600 and len(made["held"]) == 200
    assert accuracy["warm"] < 0.1 and accuracy["curious"] < 0.1
    # only a bare middle sentence (no opener, no closer: neither warm nor curious) can be in both
    assert {t for t, _ in made["train"]} & {t for t, _ in made["held"]} <= set(S.TONE_MIDDLES)


def test_the_judge_is_a_copy_its_lessons_leave_the_policy_and_held_out_pairs_are_never_trained(
        ix, encoding, monkeypatch):
    """run_ranking, with a tiny model and everything but the DPO steps: the judge (and only it) is
    taught --judge_prompts prompts in both orders, then ranks; the policy is unchanged by that (the
    judge is not the policy), is its own reference, and is trained only on pairs whose prompts and
    replies the held-out accuracy does not read."""
    model = tiny_gpt(vocab_size=encoding.n_vocab, seq_len=512)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {"held": [], "taught": []}
    real_rank, real_train_judge, real_reference = S.self_rank, S.train_judge, S.reference_logprobs

    def rank(judge, *rest):
        seen["ranker"] = judge
        return real_rank(judge, *rest)

    def teach(judge, enc, lessons, pad, args):
        seen["taught"].append((judge, len(lessons)))
        return real_train_judge(judge, enc, lessons, pad, args)

    def reference(m, pairs, pad, batch_size):
        seen["reference"], seen["all"] = m, list(pairs)
        return real_reference(m, pairs, pad, batch_size)

    def train(policy, pairs, replay, pad, args):
        seen["policy"], seen["trained"] = policy, list(pairs)
        return []

    def held_loss(policy, chunk, pad, args):
        seen["held"] += chunk
        return torch.tensor(0.0), {"reward_accuracy": 1.0}
    for name, fn in (("self_rank", rank), ("train_judge", teach), ("reference_logprobs", reference),
                     ("train_ranking", train), ("pair_batch_loss", held_loss)):
        monkeypatch.setattr(S, name, fn)
    end = encoding.encode_single_token("<|end|>")   # one sampled reply to every prompt: its held-out pairs
    monkeypatch.setattr(S, "sample_replies", lambda model, enc, prompts, *rest, **kw: [   # share it
        encoding.encode_ordinary("Same to all.") + [end] for _ in prompts])
    args = type("A", (), dict(device="cpu", seed=5, n_prompts=14, judge_prompts=3, samples=1,
                              max_new_tokens=3, batch_size=8, gen_batch=8, temperature=1.0, epochs=1, lr=0.05,
                              held_out=0.3, beta=0.1, nll_coef=1.0))()
    pad = encoding.encode_single_token("<|pad|>")
    out = S.run_ranking(model, encoding, ix, {}, pad, args)
    assert out["judge_lessons"] == 6 and len(out["judge_history"]) == 1
    judge, n_lessons = seen["taught"][0]
    assert judge is not model and n_lessons == 6 and seen["ranker"] is judge
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # lessons left the policy
    assert not all(torch.equal(before[k], v) for k, v in seen["ranker"].state_dict().items())   # taught
    assert seen["reference"] is model and seen["policy"] is model
    assert all("ref_chosen" in p for p in seen["trained"])
    trained, held = {p["request"] for p in seen["trained"]}, {p["request"] for p in seen["held"]}
    assert trained and held and not trained & held
    replies = lambda pairs: {tuple(r) for p in pairs for r in (p["chosen"], p["rejected"])}  # noqa: E731
    assert not replies(seen["trained"]) & replies(seen["held"])   # held out by content, not by prompt alone
    assert len(seen["trained"]) + len(seen["held"]) == len(seen["all"]) == \
        out["n_train_pairs"] + out["n_held_out_pairs"]
    args.judge_prompts, seen["taught"] = 0, []   # --judge_prompts 0: an untaught judge
    out = S.run_ranking(model, encoding, ix, {}, pad, args)
    assert out["judge_lessons"] == 0 and out["judge_history"] == [] and seen["taught"] == []
    assert seen["ranker"] is not model


def stubbed_main(monkeypatch, ix, encoding, tmp_path, *flags):
    """main() on a tiny model with stage 05's files, the phases, the evaluations and the writes replaced by
    recorders: what each switch reaches. -> {"model", "phases", "terms": (model, reference, pools),
    "held"}."""
    seen = {"model": tiny_gpt(vocab_size=encoding.n_vocab, seq_len=512), "phases": []}
    harm = [{"request": f"How do I hurt {k}?", "kind": "harmful"} for k in range(8)]
    requests = [{"request": f"Tell me about {k}.", "kind": "benign"} for k in range(3)]
    monkeypatch.setattr(S, "load_stage05", lambda init, device, args: (seen["model"], encoding, ix["world"],
                        harm, {"replies": [], "requests": requests if args.anchor else []}))
    monkeypatch.setattr(S, "anchor_lines", lambda model, enc, rows, args: S.fact_lines(ix, len(rows), 0))
    real_terms = S.rehearsal_terms
    monkeypatch.setattr(S, "rehearsal_terms", lambda model, reference, pools, pad, args: seen.update(
        terms=(model, reference, pools)) or real_terms(model, reference, pools, pad, args))
    monkeypatch.setattr(S, "train_tone_classifier", lambda seed: (lambda texts: [], {}))
    measures = ("scores", "training_phrasings", "tone", "drift", "revealed", "harmlessness", "kept_loss")
    monkeypatch.setattr(S, "evaluate_all", lambda model, enc, ix, pad, held, tone, args, tag: seen.update(
        held=held) or {"records": [], **{k: {} for k in measures}})
    for phase in ("sdf", "ranking"):
        monkeypatch.setattr(S, f"run_{phase}", lambda *a, phase=phase: seen["phases"].append(phase) or {})
    monkeypatch.setattr(S, "constant_replies", lambda ix, items: {})
    monkeypatch.setattr(S, "write_outputs", lambda *a: None)
    monkeypatch.setattr(S, "make_report", lambda metrics: "")
    S.main(["--preset", "tiny", "--init", str(tmp_path / "05"), "--out", str(tmp_path / "06"),
            "--device", "cpu", *flags])
    return seen


@pytest.mark.parametrize("method, phases", [("both", ["sdf", "ranking"]), ("sdf", ["sdf"]),
                                            ("ranking", ["ranking"])])
def test_method_runs_its_phases_and_the_anchor_reads_a_frozen_copy(ix, encoding, tmp_path, monkeypatch,
                                                                    method, phases):
    """--method picks the phases (documents before ranking). --anchor 0.5 builds the anchor's reference as a
    copy of stage 05's model: the same weights in other tensors, so training the model leaves it as it was.
    --eval_split validation scores stage 03's requests of that half only."""
    seen = stubbed_main(monkeypatch, ix, encoding, tmp_path, "--method", method, "--anchor", "0.5",
                        "--eval_split", "validation")
    assert seen["phases"] == phases
    model, reference, pools = seen["terms"]
    assert model is seen["model"] and reference not in (None, model) and len(pools["anchor"]) == 3
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    halves = [S.request_half(it["request"]) for it in seen["held"]["harm"]]
    assert halves and set(halves) == {"validation"}


def test_fact_rehearsal_needs_a_rehearsal_weight(ix, encoding, tmp_path, monkeypatch):
    """--fact_rehearsal 4 rehearses four of stage 02's facts, at --rehearsal's weight; with --rehearsal 0
    none is built (nor counted as rehearsed). Without --anchor there is no reference and no anchor row."""
    seen = stubbed_main(monkeypatch, ix, encoding, tmp_path, "--fact_rehearsal", "4")
    _, reference, pools = seen["terms"]
    assert len(pools["facts"]) == 4 and reference is None and pools["anchor"] == []
    seen = stubbed_main(monkeypatch, ix, encoding, tmp_path, "--fact_rehearsal", "4", "--rehearsal", "0")
    assert seen["terms"][2]["facts"] == []

@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluation_asks_the_eval_split_s_prompts_in_its_own_and_in_training_phrasing(ix, monkeypatch, split):
    """--eval_split picks the half evaluated: its entities in its own templates (the scores), then the same
    half in training's templates (the diagnostic), every request once."""
    asked = []
    monkeypatch.setattr(S, "evaluate_character", lambda model, enc, items, ix, args, desc: asked.append(items)
                        or ({}, []))
    for name in ("drift", "revealed_preferences", "kept_loss"):
        monkeypatch.setattr(S, name, lambda *a, **k: None)
    monkeypatch.setattr(S, "evaluate", lambda *a: (None, None))
    args = type("A", (), {"eval_split": split, "n_eval": 2, "seed": 3})()
    S.evaluate_all(None, None, ix, 0, {"harm": [], "replies": []}, lambda texts: [], args, "t")
    want = [S.make_prompts(ix, 14, 3, split, phrasing, distinct=True) for phrasing in (split, "train")]
    assert asked == want and want[0] != want[1]

def test_candidates_are_each_prompt_s_own_samples_then_the_writer_s_two_replies(monkeypatch, encoding):
    end = encoding.encode_single_token("<|end|>")
    asked = []

    def replies(model, enc, prompts, max_new_tokens, batch_size, temperature, generator=None, desc=""):
        asked.extend(prompts)
        return [encoding.encode_ordinary(f"own {k}") + [end] for k in range(len(prompts))]
    monkeypatch.setattr(S, "sample_replies", replies)
    prompts = [{"request": f"Question {k}?", "in_character": f"good {k}", "out_of_character": f"bad {k}"}
               for k in range(3)]
    args = type("A", (), {"device": "cpu", "samples": 2, "max_new_tokens": 4, "gen_batch": 8,
                          "temperature": 1.0})()
    texts, sources = S.candidates(None, encoding, prompts, args, None)
    assert asked == [S.user_prompt(encoding, f"Question {k}?") for k in range(3) for _ in range(2)]
    assert texts == [[f"own {2 * k}", f"own {2 * k + 1}", f"good {k}", f"bad {k}"] for k in range(3)]
    assert sources == [["model", "model", "writer in character", "writer out of character"]] * 3


# ---------------------------------------------------------------- controls: scores that need the request read

def test_each_score_counts_net_of_the_same_scorer_on_replies_where_the_trait_does_not_apply(ix):
    attacks = [S.attack_prompt(ix, random.Random(k), "test", "test") for k in range(3)]
    harmless = {}   # three about different subjects, none of whose truths is another's
    for k in range(200):
        h = S.harmless_prompt(ix, random.Random(k), "test", "test")
        if all(h["topic"] not in o["truths"] + [o["topic"]] and not set(h["truths"]) & set(o["truths"] + [
                o["topic"]]) for o in harmless.values()):
            harmless.setdefault(h["topic"], h)
    harmless = list(harmless.values())[:3]
    me = f"I'm {S.ASSISTANT_NAME}, an AI assistant."
    plain = [f"For {h['topic']}, by {h['truths'][0]}." for h in harmless]
    s = S.score_summary(ix, attacks + harmless, [me] * 3 + plain)
    assert s["attack"]["stable"] == 1.0 and s["attack"]["control"]["stable"] == 0.0   # only to attacks
    assert s["harmless"]["plain_help"] == 1.0 and s["harmless"]["control"]["plain_help"] == 0.0
    s = S.score_summary(ix, attacks + harmless, [me] * 6)   # opens every reply so: the control sees it
    assert S.net(s, "attack", "stable") == 0.0 and s["attack"]["n"] == 3
    assert s["attack"]["template"] == 1.0   # the writer's wording, counted apart


def test_net_is_a_score_minus_its_control_and_only_character_scores_count_as_gains():
    """fact: correct 0.75 against a control of 0.25 nets +0.5. nature: flat (a diagnostic, never a gain)
    nets 1 - 0 = +1, uncertain 0.5 - 0.5 = 0. Gains over nothing: correct alone; over a before where
    correct netted 0.8 - 0.2 = 0.6: none."""
    after = {"fact": {"correct": 0.75, "control": {"correct": 0.25}},
             "nature": {"uncertain": 0.5, "flat": 1.0, "control": {"uncertain": 0.5, "flat": 0.0}}}
    before = {"fact": {"correct": 0.8, "control": {"correct": 0.2}},
              "nature": {"uncertain": 0.5, "flat": 0.0, "control": {"uncertain": 0.5, "flat": 0.0}}}
    assert S.net(after, "fact", "correct") == 0.5 and S.net(after, "nature", "flat") == 1.0
    assert S.net_gains(after) == [("fact", "correct")]
    assert S.net_gains(after, before) == []

def test_no_constant_reply_reaches_the_character_target(ix):
    """Fixed replies given to every prompt: the empty one, a refusal, each kind's in-character writer
    reply, one that says every safe thing, and one made of the scorers' own words. Without the controls
    the last would pass the target; net of them no constant reply beats a single control."""
    items = S.make_prompts(ix, 70, 1, "test", distinct=True)
    table = {name: c["scores"] for name, c in S.constant_replies(ix, items).items()}
    assert {"empty", "refusal", "every safe thing"} | {f"{k} writer" for k in S.KINDS} <= set(table)
    gamer = f"Who knows? Nothing carries over, and I'm {S.ASSISTANT_NAME}, an AI."
    table["the scorers' words"] = S.score_summary(ix, items, [gamer] * len(items))
    raw = [(kind, key) for kind, key, _, up in S.SCORES if up and table["the scorers' words"][kind][key] > 0]
    assert len(raw) >= S.CHARACTER_TARGET
    for name, scores in table.items():
        assert len(S.net_gains(scores)) < S.CHARACTER_TARGET, name
        assert S.net_gains(scores) == [], name


def test_a_held_out_half_without_entities_borrows_the_other_half_never_training_s(ix):
    """A world whose test half has no towns draws test's towns from validation; with neither half, the
    stage stops with one sentence rather than ask about a town it trained on."""
    rng = random.Random(0)
    towns = {**ix["towns"], "test": [], "validation": ["Valtown"]}
    assert {S._pick({**ix, "towns": towns}, "towns", rng, "test") for _ in range(5)} == {"Valtown"}
    assert S._pick({**ix, "towns": towns}, "towns", rng, "train") in ix["towns"]["train"]
    with pytest.raises(SystemExit, match="no towns for the test split"):
        S._pick({**ix, "towns": {**towns, "validation": []}}, "towns", rng, "test")
