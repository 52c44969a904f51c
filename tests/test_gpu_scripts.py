"""Tests, on a CPU, of the scripts a GPU lease runs: scripts/tune_attention.py's tile bookkeeping and
scripts/predict_gpu_course.py's arithmetic (the scripts' timings themselves need a GPU)."""
import copy
import importlib.util
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tune(monkeypatch):
    module = _load("scripts/tune_attention.py", "tune_attention_under_test")
    kernels = module.kernels
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    monkeypatch.setattr(kernels, "_ATTN_TILES", copy.deepcopy(kernels._ATTN_TILES))
    monkeypatch.setattr(kernels, "_ATTN_TILES_SM90", copy.deepcopy(kernels._ATTN_TILES_SM90))
    return module


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_tuned_tile_is_the_one_kernels_launches(tune, monkeypatch, capability, head_dim):
    """On Hopper _ATTN_TILES_SM90 overrides _ATTN_TILES at D = 128: the tile under test must land in
    the table that wins, for every kernel the tuner times, and leave the other head dims alone."""
    monkeypatch.setattr(tune.kernels, "_CAPABILITY", capability)
    other = tune.kernels._attn_tiles(16, torch.bfloat16)
    for kernel in ("fwd", "dkdv", "dq"):
        tile = (16, 16, 1, 1)
        tune.set_tile(head_dim, kernel, tile, torch.bfloat16)
        assert tune.kernels._attn_tiles(head_dim, torch.bfloat16)[kernel] == tile
    assert tune.kernels._attn_tiles(16, torch.bfloat16) == other


def test_tune_covers_the_course_head_size():
    """Stage 01's GPU preset uses head_dim 64: the tuner's default must time it."""
    tune = _load("scripts/tune_attention.py", "tune_attention_defaults")
    pretrain_head_dim = _load("01_pretrain.py", "pretrain_for_gpu_scripts").PRESETS["gpu"]["head_dim"]
    assert pretrain_head_dim in tune.make_parser().parse_args([]).head_dims


FAKE_MEASUREMENTS = {"device": "fake", "train_ms": {"pretrain_micro": 100.0, "chat64x256": 20.0},
                     "decode_ms": {"eager": {"64": 2.0, "256": 4.0},
                                   "graphed": {"64": 1.0, "1024": 3.0}},
                     "sae_ms": {"topk:2:4": 10.0, "relu:2:0.5": 30.0}}
FAKE_PRESETS = {
    "01": dict(batch_tokens=8, micro_batch=2, seq_len=2),
    "02": dict(n_train=128, epochs=1, batch_size=64, n_eval=3, gen_batch=64, max_new_tokens=10),
    "03": dict(n_red_team=10, rounds=1, n_helpful=5, n_pairs=4, rl_steps=2, rl_prompts=3,
               samples_per_prompt=2,
               n_eval=1, batch_size=64, gen_batch=64, max_new_tokens=10, sl_epochs=1, pm_epochs=1),
    "04": dict(epochs=2, batch_size=4, gen_batch=4, max_new_tokens=10),
    "05": dict(sampled_tokens=1000, prompts_per_step=4, group_size=16, max_new_tokens=5, eval_problems=2,
               pass_samples=4, gen_batch=1024),
    "06": dict(n_prompts=6, samples=2, n_eval=1, batch_size=64, gen_batch=64, max_new_tokens=10, n_docs=64,
               sdf_epochs=1, epochs=1),
    "07": dict(sae_steps=100, expansion=2, k=4, sweep=(("relu", 2, 0.5),), steer_towns=1, steer_prompts=2,
               doses=(0, 1), rehearsal_prompts=4, concepts=1, trials=1, layers=(1,), strengths=(1,),
               batch_size=32, gen_batch=32, max_new_tokens=5, detect_steps=3),
    "08": dict(conversations=1, talks=1, talk_turns=2, gen_batch=160, max_new_tokens=4),
}
# Worked by hand, in seconds (see each line):
EXPECTED = {
    "01": 1.0,      # 5 steps x accum 8/(2*2) = 10 micro-batches x 100 ms
    "02": 0.05,     # 128/64 = 2 steps x 20 ms; 2 models x 3 x 2 tasks = 12 replies: 1 batch x 10 steps x 1 ms
    "03": 0.07,     # 30+5+8+12+4 = 59 replies: 10 x 1 ms; ceil(15/64 + 4/64 + 2) = 3 steps x 20 ms
    "04": 0.0125,   # 4 pairs x 2 / 4 = 2 steps x 20 ms x 4/64; 2 replies: 10 steps x 1 ms (64's, held flat)
    "05": 0.195,    # ceil(1000/320) = 4 rollouts: 4 x 5 x 1 ms, 8 steps x 20 ms; 24 eval replies: 5 x 3 ms
    "06": 0.05,     # 16 replies: 10 x 1 ms; ceil(70/64) = 2 steps x 20 ms
    "07": 4.04,     # 100 x (10 + 30) ms; 4+4+1 = 9 replies: 5 x 2 ms (eager); 3 steps x 20 ms x 32/64
    "08": 0.0048,   # 7 x (1 + 2) = 21 replies at batch 160: 4 steps x 1.2 ms (1 + 2 x 96/960)
}


def test_predicted_course_time_by_hand():
    predict = _load("scripts/predict_gpu_course.py", "predict_gpu_course_under_test")
    work = predict.work(FAKE_PRESETS, pretrain_steps=5, eval_tasks=2, families=3)
    seconds = predict.predict(work, FAKE_MEASUREMENTS)
    assert seconds == pytest.approx(EXPECTED, rel=1e-9)


def test_prediction_reads_the_real_presets():
    """Every GPU preset's counts resolve to a measured unit (the keys gpu_hotpaths.py writes)."""
    predict = _load("scripts/predict_gpu_course.py", "predict_gpu_course_real")
    sae = _load("07_sae_interp.py", "sae_for_gpu_scripts").PRESETS["gpu"]
    keys = [f"topk:{sae['expansion']}:{sae['k']}"] + [f"{kind}:{e}:{k}" for kind, e, k in sae["sweep"]]
    m = dict(FAKE_MEASUREMENTS, sae_ms={key: 1.0 for key in keys})
    seconds = predict.predict(predict.course_work(), m)
    assert set(seconds) == set(predict.STAGES) and all(s > 0 for s in seconds.values())
