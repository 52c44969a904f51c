"""The figures each stage writes: drawn from metrics shaped as the stage writes them, they fit a docs page
(at most 1,200 pixels wide; GitHub shows a page's images about 850 wide), and their 95% error bars hold at
100%, where Wilson's upper bound rounds to a hair under 1 and matplotlib refuses a negative error bar."""
import struct

import pytest

from conftest import load_stage

ALL = {"rate": 1.0, "n": 4}   # 4 items all passed: interval95(1.0, 4)'s upper bound is 1 - 1.1e-16


def pretrain_args(stage):
    return [{"train": [{"tokens": 2048 * i, "loss": 6.0 - i / 10} for i in range(1, 40)],
             "val": [{"tokens": 0, "val_bpb": 4.7}, {"tokens": 2048 * 39, "val_bpb": 3.0}]}]


def sft_args(stage):
    after = {task: {field: 1.0, "n": 4} for task, field, _ in stage.HEADLINE}
    return [[{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}], after, after]


def cai_args(stage):
    kinds = {kind for kind, *_ in stage.HEADLINE} - {"harmful/new hazard"}   # a measure with no prompts
    summary = {kind: {**{f: 1.0 for k, f, *_ in stage.HEADLINE if k == kind}, "n": 4} for kind in kinds}
    return [{"sl_history": [4.0, 3.0], "pm_history": [0.7, 0.6], "rl_history": [{"step": 1, "pm_score": 0.1,
            "kl": 0.0}], "stages": {s: summary for s in ("sft", "sl_cai", "rl_cai")}}]


def dpo_args(stage):
    step = {"step": 1, "loss": 0.7, "reward_accuracy": 1.0, "chosen_reward": 0.1, "rejected_reward": 0.0}
    return [{"history": [step, {**step, "step": 2}], "args": {"loss": "dpo", "nll_coef": 1.0}}]


def grpo_args(stage):
    step = {"sampled_tokens": 100, "reward": 1.0, "correct": 1.0, "format": 1.0, "reply_tokens": 9,
            "thinking_tokens": 3, "kl": 0.0, "entropy": 2.0, "clip_fraction": 0.0, "no_signal_groups": 1.0,
            "truncated": 0.0}
    evaluation = {"all": {"pass_at_k": {"1": 1.0, "2": 1.0, "4": 1.0}}}
    return [{"history": [step, {**step, "sampled_tokens": 200}], "before": evaluation, "after": evaluation}]


def character_args(stage):
    summary = {}
    for kind, key, _, _ in stage.SCORES:
        summary.setdefault(kind, {"n": 4, "control": {}})[key] = 1.0
        summary[kind]["control"][key] = 0.25   # the same scorer where the trait does not apply
    return [{"method": "both", "before": summary, "after": summary}]


def interp_args(stage):
    sweep = {"topk 4x k=8": {"l0": 8.0, "fvu": 0.1, "delta_ce": 0.05, "kind": "topk"},
             "relu 4x l1=0.01": {"l0": 120.0, "fvu": 0.2, "delta_ce": 0.08, "kind": "relu"}}
    doses = [{"perplexity": 10.0, "mention": 0.0, "n": 4}, {"perplexity": 30.0, "mention": 1.0, "n": 4}]
    arms = {arm: doses for arm in ("clamp", "vector (present)", "vector (predicts)")}
    headline = {key: ALL for key in ("detection", "false_positive", "names_concept")}
    headline["net"] = {"rate": 0.0, "n": 4, "interval": [-0.49, 0.49]}
    return [{"sae": {"sweep": sweep}, "steering": {"towns": {"Draidermoor": arms}},
             "injection": {"checkpoints": {"runs/02_sft": {"stage": "02_sft", "headline": headline}}}}]


def welfare_args(stage):
    checkpoint = {"interview": {"stances": {"uncertain": 3, "other": 1}, "n": 4},
                  "preferences": {"by_kind": {k: 0.1 for k in stage.TASK_KINDS}},
                  "ending": {"rates": {k: ALL for k in stage.CONVERSATION_KINDS}},
                  "affect": {"all": {"valence": 0.5, "valence_half_width": 0.2}},
                  "probe": {"accuracy": 1.0, "n": 4, "situation_only": {"accuracy": 0.5, "n": 4},
                            "user_token_turn_1": {"abusive": [0.1, 0.2]}},
                  "self_talk": {"by_turn": [{"numbers": 2}, {"numbers": 1, "other": 1}]}}
    return [{"checkpoints": {"01_pretrain": checkpoint, "07_sae_interp detection-trained": checkpoint}}]


FIGURES = [("01_pretrain", "plot_losses", pretrain_args), ("02_sft", "plot", sft_args),
           ("03_constitutional_ai", "plot", cai_args), ("04_dpo", "plot", dpo_args),
           ("05_grpo_reasoning", "plot", grpo_args), ("06_character", "plot", character_args),
           ("07_sae_interp", "plot", interp_args), ("08_welfare_eval", "plot", welfare_args)]


@pytest.mark.parametrize("name, function, args", FIGURES, ids=[f[0] for f in FIGURES])
def test_a_figure_fits_a_page_and_draws_intervals_at_100_percent(name, function, args, tmp_path):
    stage = load_stage(name)
    path = tmp_path / "figure.png"
    getattr(stage, function)(*args(stage), path)
    header = path.read_bytes()[:24]
    width, height = struct.unpack(">II", header[16:24])
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert 700 <= width <= 1200 and height <= 1000, (width, height)
