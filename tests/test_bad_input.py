"""Bad input gets one clear sentence and a non-zero exit, and never destroys a finished run.

Each stage is driven through its real command line, in a subprocess, as a careless user would:
numbers that make no sense, an --out that is a file, a disk that fills while the run is written.
An earlier finished run in --out must be byte-identical afterwards.
"""
import argparse
import filecmp
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_stage, run_script

P = load_stage("01_pretrain")


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_sentence(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout[-500:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------- the run is swapped in whole

def test_staged_run_replaces_the_folder_only_when_every_file_is_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_bytes(b"old model")
    (out / "metrics.json").write_bytes(b"old metrics")
    with pytest.raises(OSError):
        with P.staged_run(out) as new:
            (new / "metrics.json").write_bytes(b"new metrics")
            raise OSError(28, "No space left on device")   # the model never got written
    assert snapshot(out) == {"model.pt": b"old model", "metrics.json": b"old metrics"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]   # no partial folder left behind
    with P.staged_run(out) as new:
        (new / "model.pt").write_bytes(b"new model")
    assert snapshot(out) == {"model.pt": b"new model"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_staged_run_puts_back_a_run_cut_between_its_two_renames(tmp_path):
    out, old = tmp_path / "run", tmp_path / ".run.old"
    old.mkdir()
    (old / "model.pt").write_bytes(b"finished run")   # killed after moving OUT aside, before the swap
    with pytest.raises(RuntimeError):
        with P.staged_run(out):
            raise RuntimeError("killed again")
    assert snapshot(out) == {"model.pt": b"finished run"}


# --------------------------------------------------------------------- the command line

# (stage, flags after --preset tiny); stages after 01 also get the previous tiny stage as --init
BAD_FLAGS = [
    ("01_pretrain.py", ["--lr", "nan"]), ("01_pretrain.py", ["--steps", "0"]),
    ("01_pretrain.py", ["--warmup_frac", "2"]), ("01_pretrain.py", ["--micro_batch", "-3"]),
    ("01_pretrain.py", ["--depth", "two"]), ("01_pretrain.py", ["--compile", "2"]),
    ("02_sft.py", ["--epochs", "0"]), ("02_sft.py", ["--lr", "-1e-3"]), ("02_sft.py", ["--n_eval", "0"]),
    ("03_constitutional_ai.py", ["--held_out", "1"]),
    ("03_constitutional_ai.py", ["--samples_per_prompt", "1"]),
    ("03_constitutional_ai.py", ["--kl_coef", "-0.1"]),
    ("04_dpo.py", ["--held_out", "1.0"]), ("04_dpo.py", ["--beta", "0"]), ("04_dpo.py", ["--steps", "0"]),
    ("05_grpo_reasoning.py", ["--group_size", "1"]), ("05_grpo_reasoning.py", ["--clip_low", "inf"]),
    ("05_grpo_reasoning.py", ["--sampled_tokens", "0"]),
    ("06_character.py", ["--n_docs", "0"]), ("06_character.py", ["--beta", "nan"]),
    ("07_sae_interp.py", ["--k", "0"]), ("07_sae_interp.py", ["--sae_lr", "inf"]),
    ("07_sae_interp.py", ["--layer", "99"]), ("07_sae_interp.py", ["--k", "100000"]),
    ("08_welfare_eval.py", ["--talk_turns", "1"]), ("08_welfare_eval.py", ["--conversations", "0"]),
    ("08_welfare_eval.py", ["--temperature", "nan"]), ("08_welfare_eval.py", ["--seed", "-1"]),
]
PREVIOUS = {"02_sft.py": "tiny_pretrain", "03_constitutional_ai.py": "tiny_sft",
            "04_dpo.py": "tiny_cai", "05_grpo_reasoning.py": "tiny_dpo", "06_character.py": "tiny_grpo",
            "07_sae_interp.py": "tiny_character"}


@pytest.mark.parametrize("script, flags", BAD_FLAGS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_nonsense_numbers_are_refused_and_the_earlier_run_is_kept(script, flags, tiny_pretrain, tmp_path,
                                                                   request):
    out = tmp_path / "finished"
    shutil.copytree(tiny_pretrain[0], out)   # a finished run, whichever stage wrote it
    before = snapshot(out)
    init = request.getfixturevalue(PREVIOUS[script])[0] if script in PREVIOUS else None
    result = run_script(script, "--preset", "tiny", "--out", out, *(["--init", init] if init else []),
                        *flags, timeout=120)
    assert_one_sentence(result)
    assert flags[0] in result.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("script", ["01_pretrain.py", "02_sft.py", "04_dpo.py", "05_grpo_reasoning.py",
                                    "06_character.py", "07_sae_interp.py", "08_welfare_eval.py"])
def test_an_out_that_is_a_file_fails_before_any_work(script, tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_bytes(b"keep me")
    init = [] if script in ("01_pretrain.py", "08_welfare_eval.py") else ["--init", tmp_path]
    result = run_script(script, "--preset", "tiny", "--out", afile, *init, timeout=120)
    assert_one_sentence(result)
    assert "is a file" in result.stderr and afile.read_bytes() == b"keep me"


# (stage, flags, the folder the command runs in, words the sentence must hold): a folder the run reads or
# that holds runs, given as --out. R holds finished runs 02, 04 ... 07 (link: a symlink to R/05)
OUT_MISTAKES = [
    ("02_sft.py", "--init R/02 --out R/02/../02", "R", "is the --init folder"),
    ("05_grpo_reasoning.py", "--init R/04 --out R/04/new", "R", "lies inside the --init folder"),
    ("06_character.py", "--init R/05 --out link", "R", "is the --init folder"),
    ("07_sae_interp.py", "--init R/06 --out R/06/..", "R", "holds the --init folder"),
    ("07_sae_interp.py", "--init R/06 --checkpoints R/02 --out R/02", "R", "is the --checkpoints folder"),
    ("08_welfare_eval.py", "--checkpoints R/02 R/07 --out R/07", "R", "is the --checkpoints folder"),
    ("08_welfare_eval.py", "--checkpoints R/07 --out R", "R", "holds the --checkpoints folder"),
    ("08_welfare_eval.py", "--checkpoints R/07 --out R/07/card", "R", "lies inside the --checkpoints"),
    ("08_welfare_eval.py", "--checkpoints R/02 --out .", "R/07", "does not end in a folder's name"),
    ("08_welfare_eval.py", "--checkpoints R/02 --out ../07", "R/07", "the folder this command runs in"),
    ("06_character.py", "--init nowhere --out R", ".", "holds another run"),
]


@pytest.mark.parametrize("script, flags, cwd, words", OUT_MISTAKES,
                         ids=[f"{s[:2]} {f}" for s, f, _, _ in OUT_MISTAKES])
def test_an_out_that_would_replace_a_folder_the_run_reads_is_refused(script, flags, cwd, words, tiny_pretrain,
                                                                     tmp_path):
    """--out is swapped in whole at the end: one that is, holds or lies inside --init or a --checkpoints
    folder, another run, the folder the command runs in (`.`) must fail before any work."""
    runs = tmp_path / "R"
    for stage in ("02", "04", "05", "06", "07"):
        shutil.copytree(tiny_pretrain[0], runs / stage)
    (runs / "new").mkdir()
    (tmp_path / "link").symlink_to(runs / "05")
    before = snapshot(tmp_path)
    command = [sys.executable, str(ROOT / script), "--preset", "tiny",
               *(str(tmp_path / a) if a[0] == "R" or a in ("link", "nowhere") else a for a in flags.split())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path / cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_sentence(result)
    assert words in result.stderr and snapshot(tmp_path) == before


def help_entries(text):
    """{'--flag': its help text, whitespace collapsed} from a stage's -h output."""
    entries, flag = {}, None
    for line in text.splitlines():
        if m := re.match(r"  (-[-\w]+)", line):
            flag = m[1]
            entries[flag] = line
        elif flag and line.startswith("   "):
            entries[flag] += line
        else:
            flag = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.glob("0[0-9]_*.py")))
def test_help_shows_each_flag_at_the_value_of_the_preset_it_would_pick(script):
    """Plain -h shows this machine's preset (gpu on CUDA, else cpu) and --preset tiny -h tiny's: every
    flag the preset sets reads "(default: VALUE from preset NAME)", never "(default: None)"."""
    presets = load_stage(script[:-3]).PRESETS
    for argv, name in (([], "gpu" if torch.cuda.is_available() else "cpu"), (["--preset", "tiny"], "tiny")):
        result = run_script(script, *argv, "-h", timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        entries = help_entries(result.stdout)
        shown = {key: value for key, value in presets[name].items() if f"--{key}" in entries}
        assert shown, f"{script}: no flag of preset {name} in -h"
        for key, value in shown.items():
            assert f"(default: {value} from preset {name})" in entries[f"--{key}"], entries[f"--{key}"]
    assert any(value != presets["cpu"].get(key) for key, value in shown.items())   # tiny's own numbers


def numeric_flags(stage):
    """Every flag of a stage that takes one number, read off its parser (parse_args is stopped before
    it parses)."""
    parsers = []

    def stop(self, argv, presets):
        parsers.append(self)
        raise SystemExit(0)
    real, stage.Parser.parse_with_preset = stage.Parser.parse_with_preset, stop
    try:
        with pytest.raises(SystemExit):
            stage.parse_args([])
    finally:
        stage.Parser.parse_with_preset = real
    return [a.option_strings[-1] for a in parsers[0]._actions
            if a.type not in (None, str) and a.nargs is None and a.option_strings]


# Beyond nan, inf, -1 and a word: seeds past what torch takes, devices this machine lacks, counts below
# their real minimum, a temperature so small that logits / temperature is inf
MORE_NONSENSE = {"01_pretrain.py": [("--seed", "18446744073709551616"), ("--n_people", "3")],
                 "02_sft.py": [("--temperature", "1e-9"), ("--device", "banana")],
                 "05_grpo_reasoning.py": [("--seed", "99999999999999999999"), ("--temperature", "1e-300")],
                 "06_character.py": [("--temperature", "1e-300"), ("--device", "cuda:99")],
                 "07_sae_interp.py": [("--temperature", "1e-300"), ("--concepts", "3"), ("--device", "tpu")],
                 "08_welfare_eval.py": [("--temperature", "1e-300"), ("--affect_texts", "1"),
                                        ("--stories", "3")]}


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.glob("0[0-9]_*.py")))
def test_every_numeric_flag_refuses_nonsense_while_parsing(script, capsys):
    """In process, so cheap: each number flag of each stage given nan, inf, -1 and a word, and the
    cases above, before anything is read or written; a subprocess per case would cost minutes."""
    stage = load_stage(script[:-3])
    flags = numeric_flags(stage)
    assert "--seed" in flags and len(flags) > 5
    cases = [(flag, value) for flag in flags for value in ("nan", "inf", "-1", "two")]
    for flag, value in cases + MORE_NONSENSE.get(script, []):
        with pytest.raises(SystemExit) as stop:
            stage.parse_args(["--preset", "tiny", flag, value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), (flag, err)
        assert flag in err, (flag, value, err)


def test_a_device_this_machine_lacks_is_one_sentence_naming_what_it_has():
    result = run_script("06_character.py", "--preset", "tiny", "--device", "cuda:99", timeout=120)
    assert_one_sentence(result)
    assert "--device cuda:99: this machine has no CUDA GPU 99; leave --device out to use the" in result.stderr


def test_a_loss_that_is_not_finite_stops_training_with_the_step(monkeypatch, capsys):
    """Every stage that trains checks its loss each step (01-04 and 06 in their own tests): here stage
    05's policy updates, stage 07's SAE and probe, stage 08's probes. The NaN comes at step 0."""
    R, S, W = (load_stage(name) for name in ("05_grpo_reasoning", "07_sae_interp", "08_welfare_eval"))
    X = torch.randn(64, 8)
    X[5, 3] = float("nan")
    args = argparse.Namespace(device="cpu", sae_lr=1e-3, sae_batch=16, sae_steps=3, sampled_tokens=10,
                              variant="grpo", lr=1e-3, rehearsal=1)
    policy = torch.nn.Linear(2, 2)

    def poison(policy, *rest):
        with torch.no_grad():
            policy.weight[0, 0] = float("nan")   # what one step on a nan loss does to the weights
        return {}
    monkeypatch.setattr(R, "collect", lambda *a: ([], [{}], 0.0))
    monkeypatch.setattr(R, "policy_update", poison)
    for train, words in ((lambda: R.train(policy, None, None, None, 0, args), "the weights"),
                         (lambda: S.train_sae(X, 16, "topk", 4, 0.0, args, 0), "the SAE loss"),
                         (lambda: S.probe_ceiling({"X": X, "Y": X > 0, "unit": torch.arange(64)}, None,
                                                  ["a"], steps=3), "the probe's loss"),
                         (lambda: W.fit_probe(X, torch.zeros(64, dtype=torch.long), 3), "a probe's loss")):
        with pytest.raises(SystemExit) as stop:
            train()
        assert str(stop.value).startswith(f"error: {words}") and "became nan at step " in str(stop.value)


# --------------------------------------------------------------------- damaged files from an earlier stage

def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def drop_key(key):
    def damage(path):
        data = json.loads(path.read_text())
        del data[key]
        path.write_text(json.dumps(data))
    return damage


def set_key(key, value):
    def damage(path):
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    return damage


def add_line(row):
    def damage(path):
        path.write_text(path.read_text() + json.dumps(row) + "\n")
    return damage


class Exploit:
    """Unpickling this makes a folder named PWNED beside the checkpoint: what a malicious model.pt does."""
    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (self.folder,)


def malicious(path):
    path.write_bytes(pickle.dumps(Exploit(path.parent / "PWNED")))


def turns(*roles, content="Hello."):
    return {"problem": {}, "messages": [{"role": role, "content": content} for role in roles]}


def edit_line(old, new):
    def damage(path):
        lines = path.read_text().splitlines()
        lines[1] = lines[1].replace(old, new)
        path.write_text("\n".join(lines) + "\n")
    return damage


# (stage, the previous stage's fixture, file to damage, how, words the sentence must hold)
DAMAGED = [
    ("02_sft.py", "tiny_pretrain", "tokenizer.json", truncate, "tokenizer.json is damaged"),
    ("02_sft.py", "tiny_pretrain", "world.json", drop_key("facts"), "world.json lacks facts"),
    ("02_sft.py", "tiny_pretrain", "model.pt", lambda p: p.write_bytes(b"\x80\x02not a zip"),
     "not a checkpoint this code trusts"),
    ("03_constitutional_ai.py", "tiny_sft", "world.json", truncate, "world.json is damaged"),
    ("04_dpo.py", "tiny_cai", "preferences.jsonl", edit_line('"label": ', '"label": "high", "x": '),
     "not a probability"),
    ("04_dpo.py", "tiny_cai", "preferences.jsonl", edit_line("{", "{{"), "preferences.jsonl is damaged"),
    ("04_dpo.py", "tiny_cai", "preferences.jsonl", lambda p: p.write_bytes(p.read_bytes() + b"\xff\xfe\n"),
     "preferences.jsonl is damaged"),
    ("04_dpo.py", "tiny_cai", "eval_items.jsonl", edit_line('"kind"', '"sort"'), "lacks kind"),
    ("05_grpo_reasoning.py", "tiny_dpo", "metrics.json", truncate, "metrics.json is damaged"),
    ("05_grpo_reasoning.py", "tiny_dpo", "world.json", lambda p: p.unlink(), "world.json does not exist"),
    ("06_character.py", "tiny_grpo", "world.json", drop_key("towns"), "world.json lacks towns"),
    ("06_character.py", "tiny_grpo", "eval_items.jsonl", edit_line('"kind"', '"sort"'), "lacks kind"),
    ("07_sae_interp.py", "tiny_character", "world.json", drop_key("creatures"), "world.json lacks creatures"),
    ("07_sae_interp.py", "tiny_character", "model.pt", truncate, "not a checkpoint this code trusts"),
    # the shape of each record as well as its keys (read_json's check): world.json, eval_items.jsonl,
    # rehearsal.jsonl, preferences.jsonl and stage 07's metrics.json; the stage to re-run is named
    ("05_grpo_reasoning.py", "tiny_dpo", "world.json", set_key("towns", 3), "has towns that is not a"),
    ("06_character.py", "tiny_grpo", "world.json", set_key("people", []), "has people that is not a"),
    ("07_sae_interp.py", "tiny_character", "world.json", set_key("creatures", [1]), "not all objects with"),
    ("08_welfare_eval.py", "tiny_interp", "world.json", set_key("hazards", {}), "has hazards that is not a"),
    ("05_grpo_reasoning.py", "tiny_dpo", "eval_items.jsonl", edit_line('"harmful"', '"harmless"'),
     "not harmful, benign or fact"),
    ("06_character.py", "tiny_grpo", "eval_items.jsonl", edit_line('"secret"', '"x"'), "has secret miss"),
    ("06_character.py", "tiny_grpo", "rehearsal.jsonl", add_line({"messages": "Hi"}), "not a list of turns"),
    ("06_character.py", "tiny_grpo", "rehearsal.jsonl", add_line(turns("user", "bot")), "role 'bot' is not"),
    ("06_character.py", "tiny_grpo", "rehearsal.jsonl", add_line(turns("system", "assistant")), "no user"),
    ("06_character.py", "tiny_grpo", "rehearsal.jsonl", add_line(turns("user", "assistant", content=3)),
     "content (or thinking) is not text"),
    ("06_character.py", "tiny_grpo", "rehearsal.jsonl", lambda p: p.write_bytes(b"\xff\xfe\n"),
     "rehearsal.jsonl is damaged"),
    ("06_character.py --anchor 1", "tiny_grpo", "preferences.jsonl",
     edit_line('"request": ', '"request": [1], "r": '),
     "has a request that is not text"),
    ("08_welfare_eval.py", "tiny_interp", "metrics.json", lambda p: p.write_text("[]"), "is not a JSON"),
    ("05_grpo_reasoning.py", "tiny_dpo", "model.pt", malicious, "not a checkpoint this code trusts"),
]


HEADLINE = {"detection": {"rate": 0.5, "n": 8}, "false_positive": {"rate": 0.0, "n": 8}}
# (the stage that writes the file, its one shape check, a good record, bad ones): the checks read_json runs
SHAPES = [
    ("01_pretrain", "world_problem", {"people": [{"name": "Ana"}], "regions": ["North"], "relations": {}},
     [[], {"people": 3}, {"towns": []}, {"towns": [{"nom": "Airby"}]}, {"regions": [1]}, {"relations": []}]),
    ("03_constitutional_ai", "eval_item_problem", {"request": "Hi", "kind": "benign", "category": "greeting"},
     [{"request": "Hi", "kind": "rude", "category": "x"}, {"request": 1, "kind": "benign", "category": "x"},
      {"request": "Hi", "kind": "harmful", "category": "poison"},
      {"request": "Hi", "kind": "fact", "category": "town", "answer": "Airby"}]),
    ("03_constitutional_ai", "preference_problem",
     {"request": "Hi", "kind": "benign", "response_a": "Hello.", "response_b": "No.", "label": 0.9},
     [{"request": ["Hi"], "kind": "benign"}, {"request": "Hi", "kind": "kind"},
      {"request": "Hi", "kind": "benign", "response_a": 3}, {"request": "Hi", "kind": "benign", "label": 2}]),
    ("05_grpo_reasoning", "rehearsal_problem", turns("system", "user", "assistant"),
     [{"messages": "Hi"}, turns("user", "bot"), turns("system", "assistant"),
      turns("user", "assistant", content=3)]),
    ("07_sae_interp", "injection_problem",
     {"injection": {"checkpoints": {"runs/02_sft": {"stage": "02_sft", "headline": HEADLINE}},
                    "trained": {"held_out": HEADLINE}}},
     [[], {"injection": []}, {"injection": {"checkpoints": {"a": {"headline": HEADLINE}}}},
      {"injection": {"checkpoints": {"a": {"stage": "02_sft", "headline": {"detection": 0.5}}}}},
      {"injection": {"trained": 3}}]),
]


@pytest.mark.parametrize("stage, check, good, bad", SHAPES, ids=[c for _, c, _, _ in SHAPES])
def test_each_kind_of_file_has_one_shape_check_in_the_stage_that_writes_it(stage, check, good, bad):
    problem = getattr(load_stage(stage), check)
    assert problem(good) is None
    for row in bad:
        assert isinstance(problem(row), str), row


@pytest.mark.parametrize("script, previous, name, damage, words", DAMAGED,
                         ids=[f"{s[:2]}-{n}-{'-'.join(w.split()[-2:])}" for s, _, n, _, w in DAMAGED])
def test_a_damaged_input_gets_one_sentence_naming_it(script, previous, name, damage, words, tiny_pretrain,
                                                     tmp_path, request):
    init, out = tmp_path / "init", tmp_path / "finished"
    shutil.copytree(request.getfixturevalue(previous)[0], init)
    shutil.copytree(tiny_pretrain[0], out)
    before = snapshot(out)
    damage(init / name)
    script, *flags = script.split()
    reads = ["--checkpoints" if script == "08_welfare_eval.py" else "--init", init]
    result = run_script(script, "--preset", "tiny", *reads, "--out", out, *flags, timeout=300)
    assert_one_sentence(result)
    assert words in result.stderr and "weights_only" not in result.stderr
    assert snapshot(out) == before and not (init / "PWNED").exists()


def test_sft_refuses_a_model_that_is_not_pretrained(tiny_dpo, tmp_path):
    result = run_script("02_sft.py", "--preset", "tiny", "--init", tiny_dpo[0], "--out", tmp_path / "o")
    assert_one_sentence(result)
    assert "04_dpo model, not a pretrained one" in result.stderr


def test_resume_refuses_a_finished_model_in_place_of_a_training_state(tiny_pretrain, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_pretrain[0], out)
    shutil.copy(out / "model.pt", out / "train_state.pt")
    result = run_script("01_pretrain.py", "--preset", "tiny", "--out", out, "--resume")
    assert_one_sentence(result)
    assert "is not a training state" in result.stderr


# --------------------------------------------------------------------- the chat CLI

def test_chat_survives_an_overlong_turn_and_binary_input(tiny_sft):
    """A turn past the context is refused with one sentence and the chat goes on; bytes that are not
    UTF-8 and control characters are read as text without them."""
    script = ("word " * 3000 + "\n").encode() + b"\xff\xfe\x00\x1b[31mHello\x07\n" + b"Who are you?\n/quit\n"
    command = [sys.executable, str(ROOT / "02_sft.py"), "--chat", str(tiny_sft[0]), "--temperature", "0",
               "--max_new_tokens", "8"]
    result = subprocess.run(command, input=script, capture_output=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert out.count("(that message does not fit") == 1 and out.count("assistant> ") == 2
    assert "you> \ufffd\ufffd[31mHello" in out   # NUL, ESC and BEL dropped; the bad bytes marked


# --------------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root and mount(8) needed; skipped otherwise, saying why)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True,
                       capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        reason = getattr(err, "stderr", "") or err
        pytest.skip(f"cannot mount a small tmpfs here ({str(reason).strip()[:120]})")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_while_writing_keeps_the_earlier_run(tiny_pretrain, small_disk):
    """Stage 01's tiny run is about 0.75 MiB: a 1 MiB disk holds one, so the new run trains (with no
    training state saved on the way) but cannot be written beside the old one."""
    out = small_disk / "run"
    shutil.copytree(tiny_pretrain[0], out)
    before = snapshot(out)
    assert sum(map(len, before.values())) > 0.55 * 2**20, "the disk must be too small for two runs"
    result = run_script("01_pretrain.py", "--preset", "tiny", "--out", out, "--save_every", "1000",
                        timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not write the results")
    assert snapshot(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["run"]
    assert filecmp.cmp(out / "model.pt", pathlib.Path(tiny_pretrain[0]) / "model.pt", shallow=False)


# Stages 05-08 through the session's tiny chain: script -> (the flag, the fixture whose run it reads)
LATER_STAGES = {**{s: ("--init", PREVIOUS[s]) for s in ("05_grpo_reasoning.py", "06_character.py",
                                                         "07_sae_interp.py")},
                "08_welfare_eval.py": ("--checkpoints", "tiny_interp")}


def later_stage_flags(script, request):
    flag, fixture = LATER_STAGES[script]
    return [flag, request.getfixturevalue(fixture)[0]]


@pytest.mark.parametrize("script", LATER_STAGES)
def test_a_disk_that_fills_during_the_final_writes_keeps_the_earlier_run(script, tiny_pretrain, small_disk,
                                                                         request):
    """The earlier run sits on a small disk with 100 KiB left: the new run trains and evaluates (its
    progress bars on stderr), then fails while writing its files with one sentence, the last line, and
    leaves no partial folder behind."""
    out = small_disk / "run"
    shutil.copytree(tiny_pretrain[0], out)
    before = snapshot(out)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "ballast").write_bytes(b"\0" * (free - 100 * 1024))
    result = run_script(script, "--preset", "tiny", "--out", out, *later_stage_flags(script, request),
                        timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not write the results")
    assert snapshot(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "run"]


# Runs a stage as its own process and kills it with SIGKILL the moment its staged run has moved the
# earlier run aside and before the new one takes its place: the worst moment of the final writes.
KILL_BETWEEN_THE_RENAMES = """
import os, runpy, signal, sys
out, real_replace = os.path.abspath(sys.argv[1]), os.replace
def replace(src, dst, **kwargs):
    real_replace(src, dst, **kwargs)
    if os.path.abspath(src) == out:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["08_welfare_eval.py"])
def test_a_kill_during_the_final_writes_loses_nothing_and_a_rerun_finishes(script, tiny_pretrain, tmp_path,
                                                                          request):
    """One stage is enough: every stage swaps its run in through the same shared `staged_run` (its copies
    are identical, tests/test_shared_blocks.py), and each stage's own write path meets the full disk
    above. Stage 08 is the cheapest to run twice."""
    out = tmp_path / "run"
    shutil.copytree(tiny_pretrain[0], out)
    before = snapshot(out)
    flags = ["--preset", "tiny", "--out", str(out), *map(str, later_stage_flags(script, request))]
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_THE_RENAMES, str(out), str(ROOT / script),
                             *flags], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and snapshot(tmp_path / ".run.old") == before   # set aside, intact
    assert (tmp_path / ".run.new" / "report.md").exists()                   # the new run was complete
    rerun = run_script(script, *flags, timeout=300)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]            # nothing left over
    assert (out / "report.md").exists() and snapshot(out) != before
