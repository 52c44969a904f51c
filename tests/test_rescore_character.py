"""scripts/rescore_character.py: a trained stage 06 run scored on the other half of its held-out prompts
reproduces the run's own evaluation on the half it was trained with, and reads the half it is asked for."""
import json
import sys

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "scripts"))
import rescore_character as R  # noqa: E402
import readme_tables as T  # noqa: E402

EVALUATED = ("before", "after", "training_phrasings", "tone", "drift", "revealed", "harmlessness",
             "kept_loss", "constant_replies")


def test_rescoring_on_the_run_s_own_split_reproduces_its_numbers(tiny_character, tmp_path):
    """The tiny run was trained and scored with --eval_split test; scoring its model on test again
    gives every evaluated number exactly (greedy replies, prompts drawn by the seed)."""
    run = tiny_character[0]
    result = run_script("scripts/rescore_character.py", "--run", run, "--eval_split", "test",
                        "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr[-3000:]
    trained, again = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "again"))
    for key in EVALUATED:
        assert again[key] == trained[key], key
    assert again["phases"] == trained["phases"] and again["rescored_from"] == str(run)
    assert (tmp_path / "again" / "report.md").exists()


def test_rescoring_evaluates_the_asked_split_and_keeps_the_training_numbers(tiny_character, monkeypatch):
    """With --eval_split validation, every evaluation sees validation (its prompts and stage 03's requests
    of that half), the stage 05 model first and the trained model second; the phases are copied."""
    s06, seen = R.load_stage("06_character"), []

    def fake_evaluate_all(model, enc, ix, pad, held, tone, args, tag):
        seen.append((tag, args.eval_split, {s06.request_half(it["request"]) for it in held["harm"]}))
        return {k: {"tag": tag} for k in ("scores", "records", *EVALUATED[2:])} | {"records": []}

    monkeypatch.setattr(s06, "evaluate_all", fake_evaluate_all)
    metrics = R.rescore(s06, tiny_character[0], "validation", "cpu")
    assert seen == [("stage 05", "validation", {"validation"}), ("character", "validation", {"validation"})]
    assert metrics["eval_split"] == metrics["args"]["eval_split"] == "validation"
    assert metrics["before"] == {"tag": "stage 05"} and metrics["after"] == {"tag": "character"}
    trained = json.loads((tiny_character[0] / "metrics.json").read_text())
    assert metrics["phases"] == trained["phases"] and metrics["seconds"] == trained["seconds"]


def test_rescore_refuses_to_write_over_the_run_it_reads(tiny_character):
    run = tiny_character[0]
    result = run_script("scripts/rescore_character.py", "--run", run, "--eval_split", "validation",
                        "--out", run)
    assert result.returncode != 0 and "must differ" in result.stderr
    assert (run / "model.pt").exists()


def test_times_are_added_to_what_another_chain_wrote(tmp_path):
    """Two seeds' chains side by side write one times.json: each adds its run to the file as it is now."""
    path = tmp_path / "times.json"
    path.write_text(json.dumps({"seed1/02_sft": 5.0}))
    T.record_time(path, tmp_path / "seed2" / "02_sft", 7.0)
    assert json.loads(path.read_text()) == {"seed1/02_sft": 5.0, str(tmp_path / "seed2" / "02_sft"): 7.0}
