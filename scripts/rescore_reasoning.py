"""Score a finished stage 05 run on the other half of its held-out content, without training it again.

Stage 05 trains only on content no evaluation problem holds: the validation and test halves of the reserved
products, people and Countdown sets (`05_grpo_reasoning.py --eval_split`) are read by evaluation alone. So
one trained model can be scored on both halves: validation, where a default is chosen, and test, which is
reported and not looked at while choosing. This script repeats stage 05's evaluation (section 5,
`evaluate_problems`: greedy, then --pass_samples sampled replies a problem, each with its own seeded
generator) on the stage 04 model the run started from and on the model it wrote, on the half asked for, and
writes a run folder whose metrics.json has the run's fields, plus `rescored_from`. Training's own numbers
(the history, the harmlessness re-run, the rehearsal) are copied as they were.

    python scripts/rescore_reasoning.py --run runs/05_grpo_reasoning --eval_split validation --out runs/05_val
    python scripts/rescore_reasoning.py --run runs/05_grpo_reasoning --eval_split test --out /tmp/same

The second command reproduces the run's own numbers when it was trained with --eval_split test.
"""
import argparse
import copy
import json
import pathlib
import time

from readme_tables import load_stage, rescore_main   # this folder, on sys.path as a script


def rescore(s05, run, split, device):
    """Stage 05's evaluation of `run` (before: its stage 04 model; after: its model) on `split`."""
    metrics = json.loads((run / "metrics.json").read_text())
    args = argparse.Namespace(**{**metrics["args"], "eval_split": split, "device": device})
    start = time.time()
    world = json.loads((run / "world.json").read_text())
    enc = s05.load_tokenizer(run)
    problems = s05.make_eval_problems(world, args.families, args.eval_problems, args.seed, split)
    results = {}
    init = pathlib.Path(args.init)
    if not (init / "model.pt").exists():   # a relative --init, from another working folder: the sibling
        init = run.parent / init.name
    for when, folder in (("before", init), ("after", run)):
        model, _ = s05.load_model(folder, device, f"{folder} holds no model.pt")
        results[when] = s05.evaluate_problems(model.eval(), enc, problems, args)
    new = copy.deepcopy(metrics)
    new.update({"eval_split": split, "before": s05.summarise(problems, results["before"]),
                "after": s05.summarise(problems, results["after"]), "rescored_from": str(run),
                "args": vars(args), "rescore_seconds": time.time() - start,
                "examples": [{"question": p["question"], "answer": p["answer"], "before": b["example"],
                              "after": a["example"]}
                             for p, b, a in list(zip(problems, results["before"], results["after"]))[::7]]})
    return new


def main(argv=None):
    rescore_main(argv, __doc__, "05_grpo_reasoning", rescore, "half")


if __name__ == "__main__":
    main()
