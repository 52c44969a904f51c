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
import sys
import time

from readme_tables import load_stage   # this folder, on sys.path when run as a script


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished stage 05 run (metrics.json and model.pt)")
    p.add_argument("--eval_split", choices=("validation", "test"), required=True)
    p.add_argument("--out", required=True, help="the folder for the new metrics.json and report.md")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    run, out = pathlib.Path(args.run), pathlib.Path(args.out)
    if not (run / "metrics.json").exists():
        sys.exit(f"error: {run} is not a finished stage 05 run (no metrics.json).")
    if out.resolve() == run.resolve():
        sys.exit("error: --out must differ from --run; the trained run is kept as it is.")
    s05 = load_stage("05_grpo_reasoning")
    metrics = rescore(s05, run, args.eval_split, args.device)
    out.mkdir(parents=True, exist_ok=True)
    s05.write_atomic(out / "report.md", s05.make_report(metrics).encode("utf-8"))
    s05.write_atomic(out / "metrics.json", json.dumps(metrics, indent=1).encode("utf-8"))
    print(f"wrote {out}/ (metrics.json, report.md): {run} scored on its {args.eval_split} half in "
          f"{metrics['rescore_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
