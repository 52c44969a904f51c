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
