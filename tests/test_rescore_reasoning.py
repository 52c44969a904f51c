"""scripts/rescore_reasoning.py: a trained stage 05 run scored on the other half of its held-out content
reproduces the run's own evaluation on the half it was trained with, and reads the half it is asked for."""
import json
import sys
import types

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "scripts"))
import rescore_reasoning as R  # noqa: E402


def test_rescoring_on_the_run_s_own_half_reproduces_its_numbers(tiny_grpo, tmp_path):
    """The tiny run was trained and scored on the test half (the default); scoring its models on test
    again gives before, after and the examples exactly (seeded generators, problems drawn by the seed)."""
    run = tiny_grpo[0]
    result = run_script("scripts/rescore_reasoning.py", "--run", run, "--eval_split", "test",
                        "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr[-3000:]
    trained, again = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "again"))
    assert trained["args"]["eval_split"] == "test"
    for key in ("before", "after", "examples", "history", "harmlessness"):
        assert again[key] == trained[key], key
    assert again["rescored_from"] == str(run) and (tmp_path / "again" / "report.md").exists()


def test_rescoring_evaluates_the_asked_half_with_each_model(tiny_grpo, monkeypatch):
    """With --eval_split validation the problems are validation's, asked of the stage 04 model first and
    the trained model second."""
    s05, seen = R.load_stage("05_grpo_reasoning"), []
    real_problems = s05.make_eval_problems

    def problems(world, families, n, seed, split):
        seen.append(split)
        return real_problems(world, families, n, seed, split)
    monkeypatch.setattr(s05, "make_eval_problems", problems)
    monkeypatch.setattr(s05, "load_model", lambda folder, device, hint: (
        types.SimpleNamespace(eval=lambda: str(folder)), None))
    monkeypatch.setattr(s05, "evaluate_problems", lambda model, enc, ps, args: seen.append(model) or [
        {"greedy": True, "n": 1, "right": 1, "example": ""} for _ in ps])
    metrics = R.rescore(s05, tiny_grpo[0], "validation", "cpu")
    trained = json.loads((tiny_grpo[0] / "metrics.json").read_text())
    assert seen == ["validation", trained["args"]["init"], str(tiny_grpo[0])]
    assert metrics["eval_split"] == "validation" and metrics["args"]["eval_split"] == "validation"
    assert metrics["history"] == trained["history"]


def test_rescoring_refuses_to_write_over_the_run(tiny_grpo):
    result = run_script("scripts/rescore_reasoning.py", "--run", tiny_grpo[0], "--eval_split", "validation",
                        "--out", tiny_grpo[0])
    assert result.returncode != 0 and "must differ" in result.stderr
