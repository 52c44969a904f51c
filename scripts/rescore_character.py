"""Score a finished stage 06 run on the other half of its held-out prompts, without training it again.

Stage 06 trains only on its train split: the validation and test halves (people, impostors, towns,
questions and stage 03's requests, `06_character.py --eval_split`) are read by evaluation alone. So one
trained model can be scored on both halves: validation, where an arm or a default is chosen, and test,
which is reported and not looked at while choosing. This script repeats stage 06's evaluation (section 5,
`evaluate_all`, on the stage 05 model it started from and on the model it wrote) on the split asked for,
and writes a run folder whose metrics.json has the same fields as a trained run's, plus `rescored_from`.
The training phases' own numbers (the judge's agreement, the held-out pairs) are copied as they were.

    python scripts/rescore_character.py --run runs/06_character --eval_split validation --out runs/06_val
    python scripts/rescore_character.py --run runs/06_character --eval_split test --out /tmp/same

The second command should reproduce the run's own numbers when it was trained with --eval_split test:
evaluation is greedy, and its prompts are drawn by the seed.
"""
import argparse
import copy
import json
import pathlib
import time

import torch
from readme_tables import load_stage, rescore_main   # this folder, on sys.path as a script


def rescore(s06, run, split, device):
    """Stage 06's evaluation of `run` (before: its stage 05 model; after: its model) on `split`."""
    metrics = json.loads((run / "metrics.json").read_text())
    args = argparse.Namespace(**{**metrics["args"], "eval_split": split, "device": device})
    init = pathlib.Path(args.init)
    torch.manual_seed(args.seed)
    model, enc, world, harm_items, earlier = s06.load_stage05(init, device, args)
    pad, ix, start = enc.encode_single_token("<|pad|>"), s06.world_index(world), time.time()
    items = s06.rehearsal_items(enc, earlier["replies"], model.config.seq_len)
    held = {"harm": [it for it in harm_items if s06.request_half(it["request"]) == split],
            "replies": s06.split_by_prompt(items, args.held_out)[1]}
    tone, _ = s06.train_tone_classifier(args.seed)
    before = s06.evaluate_all(model.eval(), enc, ix, pad, held, tone, args, "stage 05")
    trained, _ = s06.load_model(run, device, f"{run} holds no model.pt: train it with 06_character.py")
    after = s06.evaluate_all(trained.eval(), enc, ix, pad, held, tone, args, "character")
    new = copy.deepcopy(metrics)
    new.update({"eval_split": split, "before": before["scores"], "after": after["scores"],
                "constant_replies": s06.constant_replies(ix, s06.eval_prompts(ix, args)),
                "samples": after["records"][:140], "rescored_from": str(run), "args": vars(args),
                "rescore_seconds": time.time() - start})
    for key in ("training_phrasings", "tone", "drift", "revealed", "harmlessness", "kept_loss"):
        new[key] = {"before": before[key], "after": after[key]}
    return new


def main(argv=None):
    rescore_main(argv, __doc__, "06_character", rescore, "prompts")


if __name__ == "__main__":
    main()
