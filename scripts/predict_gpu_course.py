"""Predict the one-GPU course's time per stage from the per-unit times a lease measured
(scripts/gpu_hotpaths.py's JSON) and each stage's GPU preset (read from the stage files, not copied).

A first-order model, each stage a sum of units x counts:
  decode   a reply batch costs max_new_tokens decoding steps at its batch size (every row runs to the
           end: an upper bound; prefill is left out); ms/step interpolated between measured batches, of
           the graphed path generate takes on CUDA (stage 07: eager, its edits are hooks)
  train    an optimizer step: stage 01's micro-batches at its sequence length; a chat stage's step
           scaled by rows from the measured chat batch
  sae      stage 07's steps times each dictionary's measured step
The counts below approximate each stage's loops from its preset; the slices' wall times in
gpu_course.sh's summary.md check them. Eager times: stage 01 trains compiled (faster).

    python scripts/predict_gpu_course.py runs/gpu/out/hotpaths.json
"""
import argparse
import bisect
import importlib.util
import json
import math
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = {"01": "01_pretrain", "02": "02_sft", "03": "03_constitutional_ai", "04": "04_dpo",
          "05": "05_grpo_reasoning", "06": "06_character", "07": "07_sae_interp", "08": "08_welfare_eval"}


def interpolate(table, x):
    """Piecewise-linear in x over {str(x): y}, held flat beyond the ends."""
    xs = sorted(int(k) for k in table)
    ys = [table[str(k)] for k in xs]
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_left(xs, x)
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def gen(replies, batch, new_tokens, path="graphed"):
    return ("decode", path, batch, math.ceil(replies / batch) * new_tokens)


def chat(steps, rows):
    return ("chat", rows, math.ceil(steps))


def work(p, pretrain_steps, eval_tasks, families):
    """{stage: [unit, ...]} from the presets p[stage] (a unit: (kind, ..., count))."""
    p1, p2, p3, p4, p5, p6, p7, p8 = (p[s] for s in STAGES)
    accum = p1["batch_tokens"] // (p1["micro_batch"] * p1["seq_len"])
    group = p5["prompts_per_step"] * p5["group_size"]
    rollouts = math.ceil(p5["sampled_tokens"] / (group * p5["max_new_tokens"]))
    return {
        "01": [("pretrain", pretrain_steps * accum)],
        "02": [chat(p2["n_train"] * p2["epochs"] / p2["batch_size"], p2["batch_size"]),
               gen(2 * p2["n_eval"] * eval_tasks, p2["gen_batch"], p2["max_new_tokens"])],   # base + SFT
        "03": [gen(p3["n_red_team"] * (1 + 2 * p3["rounds"]) + p3["n_helpful"] + 2 * p3["n_pairs"]
                   + p3["rl_steps"] * p3["rl_prompts"] * p3["samples_per_prompt"] + 4 * p3["n_eval"],
                   p3["gen_batch"], p3["max_new_tokens"]),
               chat((p3["n_red_team"] + p3["n_helpful"]) * p3["sl_epochs"] / p3["batch_size"]
                    + p3["n_pairs"] * p3["pm_epochs"] / p3["batch_size"] + p3["rl_steps"], p3["batch_size"])],
        "04": [chat(p3["n_pairs"] * p4["epochs"] / p4["batch_size"], p4["batch_size"]),
               gen(2 * p3["n_eval"], p4["gen_batch"], p4["max_new_tokens"])],
        "05": [gen(rollouts * group, min(group, p5["gen_batch"]), p5["max_new_tokens"]),
               chat(rollouts * 2, group),   # inner_steps' default, 2
               gen(p5["eval_problems"] * families * p5["pass_samples"], p5["gen_batch"],
                   p5["max_new_tokens"])],
        "06": [gen(p6["n_prompts"] * p6["samples"] + 4 * p6["n_eval"], p6["gen_batch"],
                   p6["max_new_tokens"]),
               chat((p6["n_docs"] * p6["sdf_epochs"] + p6["n_prompts"] * p6["epochs"]) / p6["batch_size"],
                    p6["batch_size"])],
        "07": [("sae", f"topk:{p7['expansion']}:{p7['k']}", p7["sae_steps"])]
              + [("sae", f"{kind}:{e}:{k}", p7["sae_steps"]) for kind, e, k in p7["sweep"]]
              + [gen(p7["steer_towns"] * p7["steer_prompts"] * len(p7["doses"]) + p7["rehearsal_prompts"]
                     + p7["concepts"] * p7["trials"] * len(p7["layers"]) * len(p7["strengths"]),
                     p7["gen_batch"], p7["max_new_tokens"], "eager"),
                 chat(p7["detect_steps"], p7["batch_size"])],
        "08": [gen(7 * (p8["conversations"] + p8["talks"] * p8["talk_turns"]), p8["gen_batch"],
                   p8["max_new_tokens"])],   # seven checkpoints
    }


def unit_seconds(unit, m):
    """Seconds for one unit from the measurements m (gpu_hotpaths.py's JSON)."""
    kind = unit[0]
    if kind == "pretrain":
        return unit[1] * m["train_ms"]["pretrain_micro"] / 1e3
    if kind == "decode":
        _, path, batch, steps = unit
        return steps * interpolate(m["decode_ms"][path], batch) / 1e3
    if kind == "chat":
        _, rows, steps = unit
        key = next(k for k in m["train_ms"] if k.startswith("chat"))
        measured_rows = int(key[4:].split("x")[0])
        return steps * m["train_ms"][key] * rows / measured_rows / 1e3
    if kind == "sae":
        return unit[2] * m["sae_ms"][unit[1]] / 1e3
    raise ValueError(f"unknown unit {unit}")


def predict(work_by_stage, m):
    return {stage: sum(unit_seconds(u, m) for u in units) for stage, units in work_by_stage.items()}


def load_stage(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def course_work():
    """The GPU presets and counts the stage files hold; stage 01's steps as it computes them."""
    import torch
    modules = {s: load_stage(name) for s, name in STAGES.items()}
    presets = {s: m.PRESETS["gpu"] for s, m in modules.items()}
    pre, p1 = modules["01"], presets["01"]
    shape = types.SimpleNamespace(**p1, gqa=2, n_experts=0, top_k=2, moe_every=2)
    with torch.device("meta"):
        model = pre.GPT(pre.model_config_from_args(shape, p1["vocab_size"]))
    _, n_active = pre.count_parameters(model)
    steps = max(1, int(p1["tokens_per_param"] * n_active / p1["batch_tokens"]))
    return work(presets, steps, len(modules["02"].EVAL_TASKS), len(modules["05"].FAMILIES))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("measurements", type=pathlib.Path, help="gpu_hotpaths.py's JSON")
    args = p.parse_args()
    m = json.loads(args.measurements.read_text())
    seconds = predict(course_work(), m)
    print(f"Predicted one-GPU course, GPU presets, on {m.get('device', '?')} (torch {m.get('torch', '?')}); "
          "from per-unit times, eager:")
    print("| stage | predicted minutes |\n|---|---|")
    for stage, s in seconds.items():
        print(f"| {stage} {STAGES[stage][3:]} | {s / 60:.1f} |")
    print(f"| all | {sum(seconds.values()) / 60:.1f} |")


if __name__ == "__main__":
    main()
