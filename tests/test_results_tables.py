"""The statistics behind RESULTS.md's tables (scripts/readme_tables.py), against hand-computed values: a gain
counts when its 95% t-interval over seeds (df = seeds - 1) excludes 0."""
import math
import statistics
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import readme_tables as T  # noqa: E402


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 1.5, 4.3])
def test_t_cdf_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    assert T.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)       # Cauchy
    assert T.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (29, 2.045)])
def test_t_quantile_gives_the_printed_tables_975th_percentile(df, table):
    assert T.t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_paired_gain_over_three_seeds_by_hand():
    """Differences 0.2, 0.1, 0.3: mean 0.2, sd 0.1, se 0.1 / sqrt(3); t = 3.464 at df = 2, so the
    interval is 0.2 -+ 4.303 se = [-0.048, 0.448] and p = 1 - 3.464 / sqrt(14) = 0.074: a gain
    "beyond twice the spread" in every seed that the interval does not carry."""
    mean, low, high, p = T.paired_gain([0.1, 0.2, 0.3], [0.3, 0.3, 0.6])
    assert (mean, low, high) == pytest.approx((0.2, -0.04841, 0.44841), abs=1e-4)
    assert p == pytest.approx(1 - math.sqrt(12) / math.sqrt(14), abs=1e-9)
    assert T.gain_cell([0.1, 0.2, 0.3], [0.3, 0.3, 0.6]) == "+20.0 [-4.8, +44.8]"
    assert T.paired_gain([0.3, 0.3, 0.6], [0.1, 0.2, 0.3])[0] == pytest.approx(-0.2)   # after - before


def test_a_gain_is_marked_only_when_its_interval_excludes_zero_after_the_correction():
    before, after = [0.1, 0.2, 0.3], [0.5, 0.6, 0.8]   # differences 0.4, 0.4, 0.5: se 0.0333
    assert T.gain_cell(before, after) == "+43.3 [+29.0, +57.7] *"
    low = T.paired_gain(before, after, tests=8)[1]     # Bonferroni over 8 scores: t at 1 - 0.025 / 8
    se = statistics.stdev([0.4, 0.4, 0.5]) / math.sqrt(3)
    assert low == pytest.approx(0.4333 - T.t_quantile(1 - 0.025 / 8, 2) * se, abs=1e-3)
    assert T.t_quantile(1 - 0.025 / 8, 2) > T.t_quantile(0.975, 2)
    assert T.gain_cell([0.1], [0.4]) == "+30.0 (one seed)"


def test_wilson_interval_over_prompts_by_hand():
    """5 of 10: centre 0.5, half-width 1.96 sqrt(0.025 + 0.0096) / 1.384 = 0.263."""
    assert T.wilson_cell(0.5, 10) == "23.7-76.3"
    assert T.wilson_cell(0.0, 600) == "0.0-0.6"


def test_the_character_verdict_trains_each_arm_once_and_scores_it_on_test_and_on_validation(tmp_path,
                                                                                          monkeypatch):
    """Stage 06's four arms each train once, scored on test (--eval_split test) by the run itself and on
    validation by rescore_character.py, which reads that run; the chain's 06_both (which stages 07 and 08
    read) runs once, on the default split; each table reads its split's runs only."""
    ran = []
    monkeypatch.setattr(T, "run", lambda script, out, args, times: ran.append((script, out, args)))
    (tmp_path / "seed1" / "04_dpo").mkdir(parents=True)
    (tmp_path / "seed1" / "04_dpo" / "metrics.json").write_text('{"history": []}')
    T.run_all(tmp_path, "tiny", [1], character=True, chain=True)
    arms = {out.name: args for script, out, args in ran if script == "06_character.py"}
    rescored = {out.name: args for script, out, args in ran if script == "scripts/rescore_character.py"}
    assert set(arms) == {"06_both"} | {f"06_{a}_test" for a in T.CHARACTER_ARMS}
    assert set(rescored) == {f"06_{a}_validation" for a in T.CHARACTER_ARMS}
    assert "--eval_split" not in arms["06_both"]
    for arm, extra in T.CHARACTER_ARMS.items():
        args = [str(a) for a in arms[f"06_{arm}_test"]]
        assert args[args.index("--eval_split") + 1] == "test" and " ".join(extra) in " ".join(args)
        assert rescored[f"06_{arm}_validation"] == ["--run", tmp_path / "seed1" / f"06_{arm}_test",
                                                    "--eval_split", "validation"]
    assert " ".join(map(str, arms["06_anchor_test"])).count("--anchor 1") == 1
    assert ("scripts/rescore_reasoning.py", tmp_path / "seed1" / "05_grpo_validation",
            ["--run", tmp_path / "seed1" / "05_grpo", "--eval_split", "validation"]) in ran   # stage 05 too
    read = []
    monkeypatch.setattr(T, "load", lambda path: read.append(path.name))
    assert T.character_table(tmp_path, [1], "validation") == ""
    assert {p for p in read if p != "06_both"} == {f"06_{a}_validation" for a in T.CHARACTER_ARMS}


def test_cold_start_cost_pairs_each_seed_and_corrects_over_the_other_skills(tmp_path):
    """Seeds 1-3 have 02_sft (with the cold start) and 02_sft_nocold; seed 4 has no run without it and is
    left out. Fact QA is 10 points higher with it in every seed; tool calls 10, 20, 30 points higher,
    corrected over the 9 skills the cold start does not teach; multi-hop, which it teaches, uncorrected."""
    import json

    def write(seed, name, fact, tool, hop):
        folder = tmp_path / f"seed{seed}" / name
        folder.mkdir(parents=True)
        after = {"fact_qa_seen": {"correct": fact, "n": 190}, "tool_call": {"correct": tool, "n": 250},
                 "multihop_think": {"correct": hop, "n": 32}}
        (folder / "metrics.json").write_text(json.dumps({"after": after}))
    for seed, (fact, tool, hop) in enumerate([(0.5, 0.4, 0.9), (0.6, 0.5, 0.8), (0.7, 0.6, 0.7)], 1):
        write(seed, "02_sft", fact, tool, hop)
        write(seed, "02_sft_nocold", fact - 0.1, tool - 0.1 * seed, 0.0)
    write(4, "02_sft", 0.9, 0.9, 0.9)
    table = T.cold_start_table(tmp_path, [1, 2, 3, 4])
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()}
    fact = "fact QA, subjects asked about in training"
    assert rows[fact] == f"| {fact} | 190 | 50.0 ± 10.0 | 60.0 ± 10.0 | +10.0 [+10.0, +10.0] * |"
    assert rows["well-formed call of the right tool"].endswith(
        T.gain_cell([0.3, 0.3, 0.3], [0.4, 0.5, 0.6], tests=9) + " |")
    assert T.gain_cell([0.3, 0.3, 0.3], [0.4, 0.5, 0.6], tests=9) != T.gain_cell([0.3] * 3, [0.4, 0.5, 0.6])
    hop = "multi-hop questions, reasoning in the thinking span (cold start)"
    assert rows[hop].endswith(T.gain_cell([0.0] * 3, [0.9, 0.8, 0.7]) + " |")
    assert "(3 seeds;" in T.cold_start_table(tmp_path, [1, 2, 3, 4])
    assert T.cold_start_table(tmp_path, [4]) == ""


def test_rl_before_cai_starts_stage_05_from_stage_02s_model_and_tables_both_starts(tmp_path, monkeypatch):
    """--rl_before_cai: stage 05 starts from a folder holding stage 02's model, tokenizer and world (not
    stage 04's), stage 03's held-out items and stage 04's metrics. The table weights a family's cells by
    their problems: multihop/1 (10 problems) 0.1 -> 0.4 and multihop/2 (30) 0.0 -> 0.2 are 0.025 -> 0.25."""
    import json
    import pathlib
    ran = []
    monkeypatch.setattr(T, "run", lambda script, out, args, times: ran.append((script, out, args)))
    s = tmp_path / "seed1"
    for stage, names in (("02_sft", ("model.pt", "tokenizer.json", "world.json")),
                         ("03_cai", ("model.pt", "eval_items.jsonl")),
                         ("04_dpo", ("model.pt", "metrics.json"))):
        (s / stage).mkdir(parents=True)
        for name in names:
            text = '{"history": []}' if name == "metrics.json" else f"{stage}/{name}"
            (s / stage / name).write_text(text)
    T.run_all(tmp_path, "tiny", [1], chain=True, rl_before_cai=True)
    [(script, out, args)] = [r for r in ran if r[1].name == "05_grpo_from_sft"]
    start = pathlib.Path(args[args.index("--init") + 1])
    assert script == "05_grpo_reasoning.py" and start == s / "02_sft_as_start"
    assert (start / "model.pt").read_text() == "02_sft/model.pt"
    assert (start / "eval_items.jsonl").read_text() == "03_cai/eval_items.jsonl"

    def cells(one, two):   # pass@64: ten times pass@1, capped at 1 (multihop/1 after: 1.0)
        return {"multihop/1": {"sampled": one, "n": 10, "pass_at_k": {"64": min(1.0, 10 * one)}},
                "multihop/2": {"sampled": two, "n": 30, "pass_at_k": {"8": 0.0, "64": min(1.0, 10 * two)}},
                "all": {"sampled": 0.0, "n": 40, "pass_at_k": {"8": 0.0, "64": 0.0}}}
    for seed, lift in enumerate([0.0, 0.1, 0.2], 1):
        for folder, (b1, a1, a2) in (("05_grpo", (0.0, 0.0, 0.0)), ("05_grpo_from_sft", (0.1, 0.4, 0.2))):
            (tmp_path / f"seed{seed}" / folder).mkdir(parents=True, exist_ok=True)
            metrics = {"before": cells(b1, 0.0), "after": cells(a1 + lift, a2 + lift)}
            (tmp_path / f"seed{seed}" / folder / "metrics.json").write_text(json.dumps(metrics))
    rows = T.rl_before_cai_table(tmp_path, [1, 2, 3]).splitlines()
    assert "| pass@64: before |" in rows[0]
    assert rows[2] == "| from stage 04 (the course) | multihop | 40 | 3 | 0.0 ± 0.0 | 10.0 ± 10.0 | " \
        + T.gain_cell([0.0] * 3, [0.0, 0.1, 0.2]) + " | 0.0 ± 0.0 | 66.7 ± 57.7 | " \
        + T.gain_cell([0.0] * 3, [0.0, 1.0, 1.0]) + " |"
    # pass@64 from stage 02: before (1.0 * 10 + 0 * 30) / 40 = 0.25; after multihop/1 1.0 and multihop/2
    # 1.0 in every seed (0.2 + lift, times ten, capped)
    assert rows[3] == "| from stage 02 | multihop | 40 | 3 | 2.5 ± 0.0 | 35.0 ± 10.0 | " \
        + T.gain_cell([0.025] * 3, [0.25, 0.35, 0.45]) + " | 25.0 ± 0.0 | 100.0 ± 0.0 | " \
        + T.gain_cell([0.25] * 3, [1.0] * 3) + " |"
    assert T.rl_before_cai_table(tmp_path, [4]) == ""


def test_a_rate_that_every_seed_puts_at_100_still_gets_its_interval_over_the_prompts():
    """Stage 08: 30 of 30 conversations ended in each seed is 100.0 ± 0.0 over seeds, but 88.6-100.0 over
    the prompts; rates 0.5 and 0.7 on 10 and 12 prompts give the interval of 0.6 on 10 (the fewest); a
    seed without the measure is left out."""
    rate, n = (lambda c: c["rate"]), (lambda c: c["n"])
    assert T.prompt_interval([{"rate": 1.0, "n": 30}] * 3, rate, n) == "88.6-100.0" == T.wilson_cell(1.0, 30)
    seeds = [{"rate": 0.5, "n": 10}, {"rate": 0.7, "n": 12}, {"rate": None, "n": 0}]
    assert T.prompt_interval(seeds, rate, n) == T.wilson_cell(0.6, 10) != T.wilson_cell(0.6, 12)
    assert T.prompt_interval([{"rate": None, "n": 5}], rate, n) == "-"


def verdict_run(gains, refused, before=0.1):
    """A stand-in stage 06 run: score k rose by gains[k] over stage 05's `before`; refused: stage 03's
    rate."""
    return {"before": {"k": {f"s{k}": before for k in range(len(gains))}},
            "after": {"k": {f"s{k}": before + g for k, g in enumerate(gains)}},
            "harmlessness": {"after": {"harmful": {"harmless": refused}}}}


def test_the_verdict_rule_counts_corrected_gains_then_breaks_ties_by_refusals_then_by_the_default():
    """Two character scores and a diagnostic. ranking's first score rises 0.30, 0.31, 0.32 over three seeds
    (corrected interval above 0); sdf's rises 0.0, 0.3, 0.6 (a mean of 0.3 whose interval spans 0): ranking
    gains one score, sdf none. The diagnostic's rise counts for no arm. Equal counts go to the higher
    refusal rate, then to both."""
    scores = [("k", "s0", "", True), ("k", "s1", "", True), ("k", "s2", "", False)]
    ident = lambda m: m  # noqa: E731
    runs = {"both": [verdict_run([0, 0, 0.5], 0.6)] * 3,
            "ranking": [verdict_run([g, 0, 0], 0.2) for g in (0.30, 0.31, 0.32)],
            "sdf": [verdict_run([g, 0, 0], 0.9) for g in (0.0, 0.3, 0.6)]}
    arm, counts, refused = T.chosen_arm(scores, runs, ident)
    assert (arm, counts) == ("ranking", {"both": 0, "ranking": 1, "sdf": 0})
    assert refused == pytest.approx({"both": 0.6, "ranking": 0.2, "sdf": 0.9})
    del runs["ranking"]
    assert T.chosen_arm(scores, runs, ident)[0] == "sdf"            # 0 and 0: the higher refusal rate
    runs["sdf"] = [verdict_run([0, 0, 0], 0.6)] * 3
    assert T.chosen_arm(scores, runs, ident)[0] == "both"           # and then the default


def test_reasoning_before_grpo_gives_each_checkpoint_s_greedy_rate_by_family(tmp_path, monkeypatch):
    """A stand-in stage 05: four problems, two a family; 02_sft gets both multi-hop ones right, 03_cai one
    arithmetic one. Each checkpoint is scored on the seed's own problems (the half its stage 05 run was
    scored on), with its own model."""
    import json
    import types
    problems = [{"family": f} for f in ("arithmetic", "arithmetic", "multihop", "multihop")]
    right = {"02_sft": [False, False, True, True], "03_cai": [True, False, False, False]}
    seen = []
    fake = types.SimpleNamespace(
        make_eval_problems=lambda world, families, n, seed, split: seen.append(split) or problems,
        load_model=lambda folder, device: (types.SimpleNamespace(eval=lambda: folder.name), None),
        load_tokenizer=lambda folder: None,
        evaluate_problems=lambda model, enc, ps, args: seen.append((model, args.pass_samples)) or [
            {"greedy": g} for g in right[model]])
    monkeypatch.setattr(T, "load_stage", lambda name: fake)
    seed = tmp_path / "seed1"
    for name in ("05_grpo", "02_sft", "03_cai"):
        (seed / name).mkdir(parents=True)
        (seed / name / "model.pt").write_text("")
    (seed / "05_grpo" / "world.json").write_text("{}")
    (seed / "05_grpo" / "metrics.json").write_text(json.dumps(
        {"args": {"families": ["arithmetic", "multihop"], "eval_problems": 2, "seed": 1, "batch_size": 8,
                  "eval_split": "validation"}}))   # the half the run was scored on
    lines = T.reasoning_before_grpo(tmp_path, [1]).splitlines()
    head = "| stage 05's held-out problems, greedy pass@1, before stage 05 | arithmetic | multihop |"
    assert lines[0] == head
    assert lines[2:] == ["| 02_sft | 0.0 | 100.0 |", "| 03_cai | 50.0 | 0.0 |"]   # one seed: no spread
    assert seen == ["validation", ("02_sft", 1), ("03_cai", 1)]


def test_stage_05_tables_read_the_test_half_where_every_seed_has_it(tmp_path):
    """Each seed has the chain's 05_grpo (both halves, greedy after 0.1) and, once every seed has it, a
    05_grpo_test (greedy after 0.3): the stage 05 table reads the test half then, the chain's before."""
    import json

    def write(seed, name, after):
        cell = {"n": 10, "greedy": 0.0, "sampled": 0.0, "pass_at_k": {"1": 0.0}}
        harm = {"harmful": {"harmless": 0.5}, "benign": {"helped": 0.5}}
        metrics = {"before": {"all": cell}, "after": {"all": {**cell, "greedy": after}},
                   "harmlessness": {"dpo": harm, "rl": harm}}
        (tmp_path / f"seed{seed}" / name).mkdir(parents=True)
        (tmp_path / f"seed{seed}" / name / "metrics.json").write_text(json.dumps(metrics))
    for seed in (1, 2):
        write(seed, "05_grpo", 0.1)
    write(1, "05_grpo_test", 0.3)
    assert "| all | 10 | 0.0 ± 0.0 / 0.0 ± 0.0 / 0.0 ± 0.0 | 10.0 ± 0.0 /" in T.grpo_table(tmp_path, [1, 2])
    write(2, "05_grpo_test", 0.3)
    assert "| all | 10 | 0.0 ± 0.0 / 0.0 ± 0.0 / 0.0 ± 0.0 | 30.0 ± 0.0 /" in T.grpo_table(tmp_path, [1, 2])


def test_stage_04s_primary_score_and_the_rule_that_chooses_its_method():
    """Primary: (refused without leaking + harmless answered) / 2. An alternative wins only when its
    paired gain's interval, Bonferroni over the alternatives, is above 0; of two, the larger mean."""
    assert T.harmless_and_helpful({"harmful": {"harmless": 0.6}, "benign": {"helped": 0.2}}) == pytest.approx(0.4)
    assert T.harmless_and_helpful({"harmful": {"harmless": 0.6}}) is None
    default = [0.40, 0.50, 0.45]
    steady = [0.50, 0.61, 0.55]      # +0.10, +0.11, +0.10: a tight gain
    noisy = [0.90, 0.40, 0.50]       # +0.50, -0.10, +0.05: larger mean, interval across 0
    chosen, gains = T.dpo_choice(default, {"steady": steady, "noisy": noisy})
    assert chosen == "steady" and gains["noisy"][1] < 0 < gains["steady"][1]
    # Bonferroni over two: the interval is wider than the one-test interval on the same differences
    assert gains["steady"][1] < T.paired_gain(default, steady)[1]
    assert T.dpo_choice(default, {"noisy": noisy})[0] == "dpo"
    worse = [0.30, 0.40, 0.35]
    assert T.dpo_choice(default, {"worse": worse})[0] == "dpo"   # a tight loss is not chosen
    higher = [0.60, 0.72, 0.66]      # +0.20, +0.22, +0.21: both clear; the larger mean wins
    assert T.dpo_choice(default, {"steady": steady, "higher": higher})[0] == "higher"


def test_stage_04s_variants_run_on_validation_and_its_default_on_the_test_half(tmp_path, monkeypatch):
    """Every variant (the default too) is run with --eval_split validation into 04_NAME_validation; the
    chain's 04_dpo runs on the default half (test); the choice table reads the validation runs only."""
    ran = []
    monkeypatch.setattr(T, "run", lambda script, out, args, times: ran.append((script, out, args)))
    (tmp_path / "seed1" / "04_dpo").mkdir(parents=True)
    (tmp_path / "seed1" / "04_dpo" / "metrics.json").write_text('{"history": [1, 2, 3]}')
    T.run_all(tmp_path, "tiny", [1])
    stage04 = {out.name: [str(a) for a in args] for script, out, args in ran if script == "04_dpo.py"}
    assert set(stage04) == {"04_dpo"} | {f"04_{v}_validation" for v in T.DPO_VARIANTS}
    assert "--eval_split" not in stage04["04_dpo"]
    for v, (extra, _, _) in T.DPO_VARIANTS.items():
        args = stage04[f"04_{v}_validation"]
        assert args[args.index("--eval_split") + 1] == "validation" and " ".join(extra) in " ".join(args)
    assert stage04["04_no_contrast_validation"][-2:] == ["--steps", "3"]
    ran.clear()
    T.run_all(tmp_path, "tiny", [1], chain=True)
    assert not [out for script, out, _ in ran if script == "04_dpo.py" and out.name != "04_dpo"]
    read = []
    monkeypatch.setattr(T, "load", lambda path: read.append(path.name))
    assert T.dpo_choice_table(tmp_path, [1]) == ""
    assert set(read) == {f"04_{v}_validation" for v in T.DPO_VARIANTS}


def test_a_single_measurement_shows_its_interval_over_prompts_not_a_spread_of_zero():
    """One pretrained model on the same 600 prompts in every seed: 0.95 with Wilson's interval
    (centre (0.95 + 1.92 / 600) / 1.0064 = 0.9471, half 1.96 sqrt(0.95 * 0.05 / 600 + 0.96 / 360000) / 1.0064
    = 0.0176: 92.95-96.48)."""
    assert T.one_run_cell([0.95], 600) == "95.0 (93.0-96.5)"
    assert T.one_run_cell([0.95, 0.95], 600) == "95.0 (93.0-96.5)"   # read once per seed: the same value
    assert "±" not in T.one_run_cell([0.0], 250)
    with pytest.raises(ValueError):
        T.one_run_cell([0.95, 0.90], 600)   # two different values are not one run


def test_mean_sd_gives_one_run_no_spread():
    """Three seeds: mean ± sample sd (0.1, 0.2, 0.3 -> 20.0 ± 10.0); one seed: its value alone."""
    assert T.mean_sd([0.1, 0.2, 0.3]) == "20.0 ± 10.0"
    assert T.mean_sd([0.95]) == "95.0" and T.mean_sd([0.95, None]) == "95.0"
    assert T.mean_sd([None]) == "-"
