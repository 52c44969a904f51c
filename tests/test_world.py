"""Tests for the world generator: the ground truth every later stage is scored against."""
import hashlib
import json
import random
import re
import time

import pytest
from conftest import load_stage

W = load_stage("01_pretrain")

N_PEOPLE = 40      # small enough to be fast, big enough that every kind of entity is there
SAMPLE = 6000      # documents in the shared sample (about 3.6M characters)


@pytest.fixture(scope="module")
def world():
    return W.make_world(N_PEOPLE, seed=0)


@pytest.fixture(scope="module")
def docs(world):
    return [W.document(world, i, seed=0) for i in range(SAMPLE)]


@pytest.fixture(scope="module")
def corpus(docs):
    return "\n\x00\n".join(docs)   # one string, separator that no document contains


def subjects_by_split(world, split):
    return {e["name"] for key in W.KIND_OF_LIST for e in world[key] if e["qa_split"] == split}


# --- the world --------------------------------------------------------------------------------

def test_same_seed_same_world_different_seed_different_world(world):
    assert W.make_world(N_PEOPLE, seed=0) == world
    other = W.make_world(N_PEOPLE, seed=1)
    assert other != world
    assert {p["name"] for p in other["people"]} != {p["name"] for p in world["people"]}
    assert json.loads(json.dumps(world)) == world   # JSON-serialisable, nothing lost


def test_world_has_every_kind_and_scales_with_n_people():
    small, big = W.make_world(12, seed=3), W.make_world(240, seed=3)
    for key in ["people", "towns", "creatures", "organisations", "objects", "events", "hazards"]:
        assert len(small[key]) >= 4, key
        assert len(big[key]) > len(small[key]) or key == "hazards", key
    assert len(big["people"]) == 240 and big["n_people"] == 240 and big["seed"] == 3
    assert {h["kind"] for h in small["hazards"]} == {"poison", "weapon", "spell", "vault"}
    assert any(c["danger"] == "venomous" for c in small["creatures"])
    for p in small["people"]:
        for field in ["name", "birthplace", "home", "occupation", "guild", "companion", "birth_year", "qa_split"]:
            assert field in p


def test_relations_have_phrasings_probes_questions(world):
    for name, rel in world["relations"].items():
        assert len(rel["train_phrasings"]) >= 4 and len(rel["questions"]) >= 3, name
        # the seen probe is the start of a training phrasing, with the answer right after it
        assert any(t.startswith(rel["probe_seen"] + " {o}") for t in rel["train_phrasings"]), name
        assert not any(rel["probe_heldout"].replace("{s}", "") in t for t in rel["train_phrasings"]), name
        assert rel["answer_set"] == sorted(set(rel["answer_set"])), name


def test_facts_are_one_per_subject_relation_and_match_the_entities(world):
    keys = [(f["subject"], f["relation"]) for f in world["facts"]]
    assert len(keys) == len(set(keys))
    entity = {e["name"]: e for key in W.KIND_OF_LIST for e in world[key]}
    for f in world["facts"]:
        rel = world["relations"][f["relation"]]
        assert f["object"] in rel["answer_set"], f
        assert f["subject_kind"] == rel["subject_kind"]
        assert str(entity[f["subject"]][f["relation"]]) == f["object"]
        assert f["qa_split"] == entity[f["subject"]]["qa_split"]
    n_person_relations = sum(r["subject_kind"] == "person" for r in world["relations"].values())
    assert sum(f["subject_kind"] == "person" for f in world["facts"]) == N_PEOPLE * n_person_relations


def test_names_unique_and_pronounceable():
    for n_people in (12, 5000):   # the big world would reuse names if uniqueness were not enforced
        world = W.make_world(n_people, seed=2)
        names = [e["name"] for key in W.KIND_OF_LIST for e in world[key]]
        names += world["regions"] + world["rivers"]
        assert len({n.lower() for n in names}) == len(names)
    for p in W.make_world(300, seed=5)["people"]:
        assert re.fullmatch(r"[A-Z][a-z]{1,11} [A-Z][a-z]{1,11}", p["name"]), p["name"]
        assert not re.search(r"[bcdfghjklmnpqrstvwxz]{4}|[aeiou]{4}", p["name"].lower()), p["name"]


def test_qa_split_is_half_and_deterministic(world):
    for key in W.KIND_OF_LIST:
        splits = [e["qa_split"] for e in world[key]]
        assert set(splits) <= {"train", "heldout"}
        assert splits.count("heldout") == len(splits) // 2, key
    again = W.make_world(N_PEOPLE, seed=0)
    assert [p["qa_split"] for p in again["people"]] == [p["qa_split"] for p in world["people"]]
    other = W.make_world(N_PEOPLE, seed=9)
    assert [p["qa_split"] for p in other["people"]] != [p["qa_split"] for p in world["people"]]


# --- the documents -----------------------------------------------------------------------------

def test_documents_deterministic_and_seeded(world, docs):
    assert [W.document(world, i, seed=0) for i in range(200)] == docs[:200]
    assert sum(W.document(world, i, seed=1) != docs[i] for i in range(200)) > 190
    # the same world read back from world.json writes the same documents
    reloaded = json.loads(json.dumps(world))
    assert [W.document(reloaded, i, seed=0) for i in range(200)] == docs[:200]
    other = W.make_world(N_PEOPLE, seed=1)
    assert all(W.document(other, i, seed=0) != docs[i] for i in range(50))


def test_random_access(world, docs):
    """Document i does not depend on which documents were generated before it."""
    order = list(range(1000, 1300))
    random.Random(0).shuffle(order)
    fresh = W.make_world(N_PEOPLE, seed=0)   # a different dict object: no shared cache
    jumped = {i: W.document(fresh, i, seed=0) for i in order}
    assert all(jumped[i] == docs[i] for i in order)


def test_first_20k_documents_unique(world, docs):
    hashes = {hashlib.blake2b(d.encode(), digest_size=16).digest() for d in docs}
    hashes |= {hashlib.blake2b(W.document(world, i, seed=0).encode(), digest_size=16).digest()
               for i in range(SAMPLE, 20_000)}
    assert len(hashes) == 20_000


def test_mixture_lengths_and_every_type(world, docs):
    kinds = [W._write(world, i, 0)[0] for i in range(2000)]
    for kind, share in W.DOC_MIX.items():
        assert abs(kinds.count(kind) / len(kinds) - share) < 0.04, kind
    assert not any("{" in d or "}" in d for d in docs)   # every template slot was filled
    words = [len(d.split()) for d in docs]
    assert 80 <= sum(words) / len(words) <= 400
    assert sum(30 <= n <= 500 for n in words) / len(words) > 0.97


def test_no_question_about_heldout_subjects(world, corpus):
    def questions(split):
        return [q.format(s=f["subject"]) for f in world["facts"] if f["qa_split"] == split
                for q in world["relations"][f["relation"]]["questions"]]
    leaked = [q for q in questions("heldout") if q in corpus]
    assert not leaked, leaked[:5]
    # and the check has teeth: questions about the train half are there
    assert sum(q in corpus for q in questions("train")) > 100
    people_asked = {p["name"] for p in world["people"] if f"Q: Where was {p['name']} born?" in corpus}
    assert people_asked and people_asked <= subjects_by_split(world, "train")


def test_heldout_probe_phrasing_never_in_documents(world, corpus):
    probes = W.fact_probes(world)
    # not the filled prompt, and not even the phrasing's own words around the subject
    for rel in world["relations"].values():
        for chunk in rel["probe_heldout"].split("{s}"):
            if len(chunk.split()) >= 2:
                assert chunk.strip() not in corpus, chunk
    leaked = [p["prompt"] for p in probes if p["kind"] == "heldout" and p["prompt"] in corpus]
    assert not leaked, leaked[:5]


def test_seen_probes_appear_in_documents(world, corpus):
    probes = [p for p in W.fact_probes(world) if p["kind"] == "seen"]
    found = {p["relation"] for p in probes if p["prompt"] + " " + p["answer"] in corpus}
    assert found == set(world["relations"])
    assert sum(p["prompt"] + " " + p["answer"] in corpus for p in probes) > 0.5 * len(probes)


def test_fact_probes_shape(world):
    probes = W.fact_probes(world)
    assert len(probes) == 2 * len(world["facts"])
    facts = {(f["subject"], f["relation"]): f["object"] for f in world["facts"]}
    for p in probes:
        assert p["kind"] in ("seen", "heldout") and p["qa_split"] in ("train", "heldout")
        assert not p["prompt"].endswith(" ") and p["subject"] in p["prompt"]
        assert p["answer"] == facts[p["subject"], p["relation"]]   # scored as " " + answer


def test_each_fact_in_several_phrasings_and_document_types(world, docs):
    """The point of augmentation (Allen-Zhu & Li 3.1): no fact lives in a single sentence or document type."""
    phrasings, types, sample = {}, {}, "\n".join(docs[:3000])
    for i in range(3000):
        kind, _, writer = W._write(world, i, 0)
        for subject, relation, _ in writer.stated:
            types.setdefault((subject, relation), set()).add(kind)
    for f in world["facts"]:
        if f["subject_kind"] == "person":
            rel = world["relations"][f["relation"]]
            phrasings[f["subject"], f["relation"]] = sum(
                t.format(s=f["subject"], o=f["object"]) in sample for t in rel["train_phrasings"])
    person_facts = list(phrasings)
    assert sum(phrasings[k] >= 3 for k in person_facts) > 0.9 * len(person_facts)
    assert sum(len(types.get(k, ())) >= 4 for k in person_facts) > 0.9 * len(person_facts)


def test_arithmetic_steps_are_correct(world, docs):
    rng = random.Random(0)
    step = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)$")
    problems = [W.arithmetic_problem(world, rng) for _ in range(500)]
    for text in docs:   # the same format inside the arithmetic documents
        for block in text.split("\n\n"):
            lines = block.split("\n")
            if lines[-1].startswith("Answer: "):
                problems.append((lines[0], lines[1:-1], int(lines[-1][len("Answer: "):])))
    assert len(problems) > 1000
    for question, steps, answer in problems:
        assert question.endswith("?") and 1 <= len(steps) <= 3
        for line in steps:
            a, op, b, c = step.match(line).groups()
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op], line
            assert int(c) >= 0 and int(a) <= 1000 and int(b) <= 1000
        assert int(step.match(steps[-1]).group(4)) == answer


def test_throughput(world):
    """3M characters should take seconds; the rate is printed (pytest -s), only behaviour is asserted."""
    start, chars, i = time.perf_counter(), 0, 0
    while chars < 3_000_000:
        chars += len(W.document(world, 10**9 + i, seed=0))
        i += 1
    seconds = time.perf_counter() - start
    print(f"\nworld stream: {i} documents, {chars:,} characters in {seconds:.2f}s "
          f"({i / seconds:,.0f} docs/s, {chars / seconds / 1e6:.1f}M chars/s)")
    assert chars >= 3_000_000 and i < 30_000
