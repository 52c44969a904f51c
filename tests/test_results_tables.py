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


def test_the_character_verdict_runs_each_arm_on_validation_and_on_test_and_reads_each_apart(tmp_path,
                                                                                               monkeypatch):
    """Stage 06's four arms each run twice, --eval_split validation and test, into folders of their own;
    the chain's 06_both (which stages 07 and 08 read) runs once, on the default split; each table reads
    its split's runs only."""
    ran = []
    monkeypatch.setattr(T, "run", lambda script, out, args, times: ran.append((script, out.name, args)))
    (tmp_path / "seed1" / "04_dpo").mkdir(parents=True)
    (tmp_path / "seed1" / "04_dpo" / "metrics.json").write_text('{"history": []}')
    T.run_all(tmp_path, "tiny", [1], character=True, chain=True)
    arms = {out: args for script, out, args in ran if script == "06_character.py"}
    assert set(arms) == {"06_both"} | {f"06_{a}_{s}" for a in T.CHARACTER_ARMS for s in T.SPLITS}
    assert "--eval_split" not in arms["06_both"]
    for arm, extra in T.CHARACTER_ARMS.items():
        for split in ("validation", "test"):
            args = [str(a) for a in arms[f"06_{arm}_{split}"]]
            assert args[args.index("--eval_split") + 1] == split and " ".join(extra) in " ".join(args)
    assert " ".join(map(str, arms["06_anchor_test"])).count("--anchor 1") == 1
    read = []
    monkeypatch.setattr(T, "load", lambda path: read.append(path.name))
    assert T.character_table(tmp_path, [1], "validation") == ""
    assert {p for p in read if p != "06_both"} == {f"06_{a}_validation" for a in T.CHARACTER_ARMS}
