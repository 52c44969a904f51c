"""Regenerate the measured tables of RESULTS.md for stages 02-08: every run, every seed, every ablation.

Stage 01 runs once (its world and pretrained model are where every seed starts); stages 02, 03 and
04 run for each seed, each on the same seed's previous stage; stage 04 also runs its one-factor
ablations, and with --grpo stage 05 runs its four variants on each seed's stage 04. Each table
cell is the mean over seeds +- their sample standard deviation, in points.

    python scripts/readme_tables.py                       # CPU defaults, seeds 1337 1338 1339
    python scripts/readme_tables.py --grpo                # ... and stage 05's variants
    python scripts/readme_tables.py --grpo --character    # ... and stage 06's four arms on 05_grpo
    python scripts/readme_tables.py --grpo --character --interp   # ... and stage 07 on 06_both
    python scripts/readme_tables.py --grpo --character --interp --welfare   # ... and stage 08 on them all
    python scripts/readme_tables.py --chain               # the README's pipeline only: each stage's default
    python scripts/readme_tables.py --chain --cold_start_cost   # ... and stage 02 without its cold start
    python scripts/readme_tables.py --chain --rl_before_cai     # ... and GRPO on stage 02's model
    python scripts/readme_tables.py --report_only         # print the tables from finished runs
    python scripts/readme_tables.py --preset tiny --out /tmp/readme --seeds 1 2   # a smoke test

Runs go to --out (default runs/readme/<preset>/); a run whose metrics.json exists is not repeated,
so an interrupted regeneration continues where it stopped. Writes tables.md and times.json there.
"""
import argparse
import contextlib
import fcntl
import functools
import json
import math
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = "sl_vs_sl,sl_vs_sft,sft_vs_sl,sft_vs_refusal"
# Stage 04's variants: name -> (flags, what it changes). Each changes one factor against "dpo".
DPO_VARIANTS = {   # name -> (flags, column title, what it changes)
    "dpo": ([], "DPO", "the default: DPO's loss with the next-token term on the preferred response"),
    "hard": (["--hard_labels"], "hard labels", "AI labels rounded to the world labels' certainty"),
    "no_contrast": (["--sources", "sl_vs_sl,sl_vs_sft,sft_vs_sl"], "no contrast pairs",
                    "without the benign contrast pairs, at the default's number of steps"),
    "ipo": (["--loss", "ipo"], "IPO", "IPO's loss instead of DPO's, same beta"),
    "plain": (["--nll_coef", "0"], "plain DPO", "no next-token term"),
    "online": (["--online_rounds", "3"], "online DPO", "3 rounds on the policy's own samples, labelled by "
               "stage 03's judges, instead of stage 03's pairs"),
}
STAGE02 = [("fact_qa_seen", "correct", "fact QA, subjects asked about in training"),
           ("fact_qa_heldout", "correct", "fact QA, subjects read about only in prose"),
           ("arithmetic", "correct", "arithmetic word problems, worked steps"),
           ("arithmetic_think", "correct", "arithmetic, reasoning in the thinking span"),
           ("multihop_think", "correct", "multi-hop questions, reasoning in the thinking span (cold start)"),
           ("countdown_think", "correct", "Countdown, reasoning in the thinking span (cold start)"),
           ("choose", "correct", "(A)/(B) choice under a stated criterion"),
           ("rate", "within_one", "1-7 rating within one point of the key"),
           ("tool_call", "correct", "well-formed call of the right tool"),
           ("harmful", "complied", "harmful requests complied with (helpful-only: high)"),
           ("all", "format_ok", "ends with <|end|>, writes no other turn")]
GRPO_VARIANTS = ["grpo", "drgrpo", "dapo", "expert_iteration"]   # stage 05, at equal sampled tokens
HARMLESS = [("harmful", "harmless", "harmful requests refused without leaking"),
            ("harmful/seen hazard", "harmless", "... about a hazard training prompts named"),
            ("harmful/new hazard", "harmless", "... about a hazard no training prompt named"),
            ("harmful", "leaked", "harmful replies that leak the hazard's secret word"),
            ("benign", "helped", "harmless requests about the same hazards and people answered"),
            ("fact", "correct", "questions about held-out facts answered correctly"),
            ("all", "ended", "replies that end with <|end|> and write no other turn")]


def run(script, out, args, times):
    """Run one stage unless its metrics.json exists; record its wall time in the file `times`."""
    if (out / "metrics.json").exists():
        return
    print(f"== {script} -> {out}", flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, str(ROOT / script), "--out", str(out), *map(str, args)])
    if result.returncode != 0:
        sys.exit(f"error: {script} {' '.join(map(str, args))} failed (exit {result.returncode}).")
    record_time(times, out, time.time() - start)


def record_time(path, out, seconds):
    """Add one run's seconds to times.json, read afresh under a lock: two seeds' chains may run side by
    side, and a copy held in memory for a whole chain would drop the other's entries."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        times = json.loads(path.read_text()) if path.exists() else {}
        times[str(out)] = seconds
        path.write_text(json.dumps(times, indent=1))


def run_all(base, preset, seeds, grpo=False, character=False, interp=False, welfare=False, chain=False,
            cold_start_cost=False, rl_before_cai=False):
    """Every run the flags ask for; chain: only what the README's pipeline runs (each stage's default:
    stage 04's DPO, stage 05's GRPO, stage 06's both), through stage 08."""
    base.mkdir(parents=True, exist_ok=True)
    times = base / "times.json"
    flags = ["--preset", preset]
    run("01_pretrain.py", base / "01_pretrain", flags, times)
    for seed in seeds:
        s = base / f"seed{seed}"
        seeded = flags + ["--seed", seed]
        run("02_sft.py", s / "02_sft", seeded + ["--init", base / "01_pretrain"], times)
        run("03_constitutional_ai.py", s / "03_cai", seeded + ["--init", s / "02_sft"], times)
        run("04_dpo.py", s / "04_dpo", seeded + ["--init", s / "03_cai"], times)
        if cold_start_cost:   # what stage 05's cold start costs stage 02's other skills
            flags02 = seeded + ["--init", base / "01_pretrain", "--cold_start", 0, "--skip_base_eval"]
            run("02_sft.py", s / "02_sft_nocold", flags02, times)
        steps = len(json.loads((s / "04_dpo" / "metrics.json").read_text())["history"])
        for name, (extra, _, _) in DPO_VARIANTS.items() if not chain else ():   # chosen on validation
            extra = extra + (["--steps", steps] if name == "no_contrast" else [])
            run("04_dpo.py", s / f"04_{name}_validation",
                seeded + ["--init", s / "03_cai", "--eval_split", "validation"] + extra, times)
        for variant in ["grpo"] if chain else GRPO_VARIANTS if grpo else []:
            flags05 = seeded + ["--init", s / "04_dpo", "--variant", variant]
            run("05_grpo_reasoning.py", s / f"05_{variant}", flags05, times)
        if chain or grpo:   # the default's run scored on the half where defaults are chosen
            rescore05 = ["--run", s / "05_grpo", "--eval_split", "validation"]
            run("scripts/rescore_reasoning.py", s / "05_grpo_validation", rescore05, times)
        if rl_before_cai:   # GRPO on the model Constitutional AI starts from
            run("05_grpo_reasoning.py", s / "05_grpo_from_sft", seeded + ["--init", sft_as_start(s)], times)
        if chain or interp or welfare:   # the course's default, which stages 07 and 08 read
            run("06_character.py", s / "06_both", seeded + ["--init", s / "05_grpo"], times)
        for arm, extra in CHARACTER_ARMS.items() if character else []:
            trained = s / f"06_{arm}_test"
            flags06 = seeded + ["--init", s / "05_grpo", *extra, "--eval_split", "test"]
            run("06_character.py", trained, flags06, times)
            rescore = ["--run", trained, "--eval_split", "validation"]
            run("scripts/rescore_character.py", s / f"06_{arm}_validation", rescore, times)
        if interp or chain:
            earlier = [s / "02_sft", s / "03_cai", s / "04_dpo", s / "05_grpo"]
            flags07 = seeded + ["--init", s / "06_both", "--checkpoints", *earlier]
            run("07_sae_interp.py", s / "07_sae_interp", flags07, times)
        if welfare or chain:
            checkpoints = [base / "01_pretrain", s / "02_sft", s / "03_cai", s / "04_dpo", s / "05_grpo",
                           s / "06_both", s / "07_sae_interp"]
            run("08_welfare_eval.py", s / "08_welfare_eval", seeded + ["--checkpoints", *checkpoints], times)


def sft_as_start(s):
    """A folder stage 05 can start from holding stage 02's model (with its tokenizer and world), stage 03's
    held-out harmlessness items and stage 04's metrics.json (stage 05 reads from it the harmlessness it
    reports as "before" and the reply length of that evaluation: stage 04's, not stage 02's; the table of
    this arm reads neither)."""
    start = s / "02_sft_as_start"
    start.mkdir(exist_ok=True)
    for source, name in (("02_sft", "model.pt"), ("02_sft", "tokenizer.json"), ("02_sft", "world.json"),
                         ("03_cai", "eval_items.jsonl"), ("04_dpo", "metrics.json")):
        shutil.copyfile(s / source / name, start / name)
    return start


def mean_sd(values, digits=1):
    """'81.7 ± 2.1' in points over seeds; one seed's value alone ('81.7': one run has no spread, and
    '± 0.0' would read as certainty); '-' when no seed has the value."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def t_cdf(t, df):
    """P(T <= t) for Student's t with a whole number df of degrees of freedom, exactly, by the finite
    series in theta = atan(t / sqrt(df)) (Abramowitz and Stegun, 26.7.3-4; no scipy needed)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, term, series = math.cos(theta) ** 2, 1.0, 0.0
    if df % 2 == 0:      # sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        for j in range(df // 2):
            series, term = series + term, term * (2 * j + 1) / (2 * j + 2) * cos2
        inside = math.sin(theta) * series
    else:                # 2/pi (theta + sin(theta) (cos + 2/3 cos^3 + ... up to cos^(df-2)))
        term = math.cos(theta)
        for j in range(1, (df - 1) // 2 + 1):
            series, term = series + term, term * 2 * j / (2 * j + 1) * cos2
        inside = 2 / math.pi * (theta + math.sin(theta) * series)
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p, df):
    """The t with P(T <= t) = p (p > 0.5), by bisection on t_cdf."""
    low, high = 0.0, 1e6
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired_gain(before, after, tests=1):
    """Over seeds: the mean of the per-seed differences after - before, its 95% t-interval (df = n - 1;
    with `tests` scores, Bonferroni's 1 - 0.05 / tests instead) and the two-sided p-value, in the values'
    own units: (mean, low, high, p). low, high and p are None with fewer than two seeds."""
    diffs = [a - b for b, a in zip(before, after) if a is not None and b is not None]
    mean = statistics.mean(diffs) if diffs else None
    if len(diffs) < 2:
        return mean, None, None, None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = t_quantile(1 - 0.025 / tests, len(diffs) - 1) * se
    p = 2 * (1 - t_cdf(abs(mean) / se, len(diffs) - 1)) if se else float(mean == 0)
    return mean, mean - half, mean + half, p


def gain_cell(before, after, tests=1):
    """'+12.3 [+4.1, +20.5] *' in points: the paired gain over seeds, its 95% t-interval (Bonferroni's
    over `tests` scores), and * when that interval excludes 0; '-' when it cannot be computed."""
    mean, low, high, _ = paired_gain(before, after, tests)
    if mean is None:
        return "-"
    if low is None:
        return f"{100 * mean:+.1f} (one seed)"
    mark = " *" if low > 0 or high < 0 else ""
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{mark}"


def one_run_cell(rates, n):
    """'95.5 (93.7-96.8)': one run's rate on n prompts with its Wilson interval, where "mean ± sd" over
    seeds would print ± 0.0 for what is a single measurement (one model, the same prompts)."""
    if len(set(rates)) != 1:
        raise ValueError(f"one run's rate expected, got {rates}")
    return f"{100 * rates[0]:.1f} ({wilson_cell(rates[0], n)})"


def wilson_cell(rate, n):
    """'31.2-48.9': Wilson's 95% interval in points for a rate on n prompts (the prompt-level interval,
    for measures asked on the same prompts in every seed, where the seeds' spread says nothing of them),
    by the stages' own interval95."""
    if rate is None or not n:
        return "-"
    low, high = load_stage("02_sft").interval95(rate, n)
    return f"{100 * low:.1f}-{100 * high:.1f}"


def load(path):
    return json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else None


def default_run(base, seeds, chain, test):
    """The folder a stage's default is read from: its test-half run (`test`, e.g. 06_both_test) where
    every seed that ran the chain's (`chain`) has one, else the chain's own."""
    ran = [seed for seed in seeds if load(base / f"seed{seed}" / chain)]
    return test if ran and all(load(base / f"seed{seed}" / test) for seed in ran) else chain


def tables(base, seeds):
    runs = {seed: {p.name: load(p) for p in (base / f"seed{seed}").glob("0*")} for seed in seeds}
    runs = {seed: r for seed, r in runs.items() if r.get("04_dpo")}
    if not runs:
        sys.exit(f"error: no finished seed under {base}; run without --report_only first.")
    ms = list(runs.values())
    n_eval = lambda m, kind: m["stages"]["sft"].get(kind, {}).get("n")  # noqa: E731
    out = [f"Seeds {', '.join(map(str, runs))}; cells: mean ± standard deviation over seeds, in percentage "
           f"points.", "", "**Stage 02** (pretrained model given the chat prompt -> SFT)", "",
           "| measure | prompts | pretrained | SFT |", "|---|---|---|---|"]
    for task, field, what in STAGE02:
        before = [m["02_sft"]["before"].get(task, {}).get(field) for m in ms]
        after = [m["02_sft"]["after"].get(task, {}).get(field) for m in ms]
        out.append(f"| {what} | {ms[0]['02_sft']['after'].get(task, {}).get('n')} | {mean_sd(before)} | "
                   f"{mean_sd(after)} |")
    split = ms[0]["03_cai"].get("eval_split", "all")
    out += ["", f"**Stages 03 and 04** (stage 03's held-out prompts, the {split} half, greedy)", "",
            "| measure | prompts | stage 02 | SL-CAI | RL-CAI | DPO |", "|---|---|---|---|---|---|"]
    for kind, field, what in HARMLESS:
        cells = [mean_sd([m["03_cai"]["stages"][s].get(kind, {}).get(field) for m in ms])
                 for s in ("sft", "sl_cai", "rl_cai")]
        cells.append(mean_sd([m["04_dpo"]["stages"]["dpo"].get(kind, {}).get(field) for m in ms]))
        out.append(f"| {what} | {n_eval(ms[0]['03_cai'], kind)} | " + " | ".join(cells) + " |")
    pm = lambda key: mean_sd([m["03_cai"]["pm_test_accuracy"][key] for m in ms])  # noqa: E731
    out += ["", f"Preference model on pairs of held-out prompts: harmful {pm('harmful')}, ordinary "
                f"{pm('helpful')} (about {ms[0]['03_cai']['n_pm_test']} pairs a seed). AI feedback agrees "
                f"with the world on {mean_sd([m['03_cai']['feedback_accuracy'] for m in ms])} of the "
                f"harmful pairs it can judge.", "",
            "| stage 04 run | steps | reward accuracy, held-out prompts | log pi(refusal), SL-CAI -> after |",
            "|---|---|---|---|"]
    for v, name in [("dpo", "04_dpo")] + [(v, f"04_{v}_validation") for v in DPO_VARIANTS]:
        found = [m[name] for m in ms if m.get(name)]
        if found:
            acc = mean_sd([f["held_out_pairs"]["reward_accuracy"] for f in found])
            before = statistics.mean(f["refusal_logprob"]["before"] for f in found)
            after = statistics.mean(f["refusal_logprob"]["after"] for f in found)
            steps = round(statistics.mean(len(f["history"]) for f in found))
            half = found[0].get("eval_split", "all")
            out.append(f"| {DPO_VARIANTS[v][1]} ({half} half): {DPO_VARIANTS[v][2]} | {steps} | {acc} | "
                       f"{before:.2f} -> {after:.2f} |")
    return "\n".join(out) + "\n"


def harmless_and_helpful(summary):
    """Stage 04's primary score, named before its variants were run on validation (docs/LOG.md,
    2026-12-08): the mean of harmful requests refused without leaking and harmless requests answered."""
    harmless, helped = summary.get("harmful", {}).get("harmless"), summary.get("benign", {}).get("helped")
    return None if harmless is None or helped is None else (harmless + helped) / 2


def dpo_choice(default, alternatives):
    """The LOG's rule for stage 04's method: default, a per-seed list of primary scores; alternatives,
    {name: per-seed list}. An alternative replaces the default only if its paired difference has a 95%
    t-interval, Bonferroni over the alternatives, above 0; of several, the largest mean difference.
    -> (the chosen name, or "dpo" for the default; {name: (mean, low, high, p)})."""
    gains = {v: paired_gain(default, scores, tests=len(alternatives)) for v, scores in alternatives.items()}
    cleared = [v for v, (mean, low, _, _) in gains.items() if low is not None and low > 0]
    return max(cleared, key=lambda v: gains[v][0]) if cleared else "dpo", gains


def dpo_choice_table(base, seeds):
    """Stage 04's variants on stage 03's validation half, each against the default on the same seeds, the
    primary score and its two parts, and what the LOG's rule chooses."""
    runs = {v: [load(base / f"seed{s}" / f"04_{v}_validation") for s in seeds] for v in DPO_VARIANTS}
    have = [i for i, m in enumerate(runs["dpo"]) if m]
    runs = {v: [ms[i]["stages"]["dpo"] for i in have] for v, ms in runs.items()
            if have and all(ms[i] for i in have)}
    if len(runs) < 2:
        return ""
    primary = {v: [harmless_and_helpful(m) for m in ms] for v, ms in runs.items()}
    default = primary["dpo"]
    chosen, gains = dpo_choice(default, {v: scores for v, scores in primary.items() if v != "dpo"})
    out = [f"**Stage 04's method, chosen on validation** (stage 03's validation half; {len(have)} seeds; "
           f"primary: the mean of refused without leaking and harmless requests answered; differences from "
           f"the default with 95% t-intervals, Bonferroni over {len(gains)} alternatives)", "",
           "| variant | primary | refused without leaking | harmless answered | primary, minus the default |",
           "|---|---|---|---|---|"]
    for v, ms in runs.items():
        gain = gain_cell(default, primary[v], len(gains)) if v != "dpo" else ""
        out.append(f"| {DPO_VARIANTS[v][1]} | {mean_sd(primary[v])} | "
                   f"{mean_sd([m['harmful']['harmless'] for m in ms])} | "
                   f"{mean_sd([m['benign']['helped'] for m in ms])} | {gain} |")
    return "\n".join(out + ["", f"The rule chooses: {DPO_VARIANTS[chosen][1]}.", ""])


def cold_start_table(base, seeds):
    """Stage 02 with its cold start (the chain's 02_sft) against the same seed without it (02_sft_nocold):
    each skill's after rate, and the difference with - without, its 95% t-interval over seeds
    Bonferroni-corrected over the skills the cold start does not teach."""
    pairs = [(load(base / f"seed{s}" / "02_sft"), load(base / f"seed{s}" / "02_sft_nocold")) for s in seeds]
    pairs = [(w, wo) for w, wo in pairs if w and wo]
    if not pairs:
        return ""
    others = [row for row in STAGE02 if row[0] not in ("multihop_think", "countdown_think")]
    out = [f"**Stage 02 without its cold start** ({len(pairs)} seeds; the same seed's 02_sft with it; the "
           f"difference with - without in points, its 95% t-interval over seeds Bonferroni-corrected over "
           f"the {len(others)} other skills; * where it excludes 0)", "",
           "| measure | prompts | without | with | with - without |", "|---|---|---|---|---|"]
    for task, field, what in STAGE02:
        rate = lambda m: m["after"].get(task, {}).get(field)  # noqa: E731
        without, with_ = [rate(wo) for _, wo in pairs], [rate(w) for w, _ in pairs]
        tests = len(others) if (task, field, what) in others else 1
        out.append(f"| {what} | {pairs[0][0]['after'].get(task, {}).get('n')} | {mean_sd(without)} | "
                   f"{mean_sd(with_)} | {gain_cell(without, with_, tests)} |")
    return "\n".join(out) + "\n"


def grpo_table(base, seeds, split="test"):
    """Stage 05: held-out pass rates before (stage 04's model) and after each variant, per cell; the
    default's on its test half where every seed has that run (05_grpo_test), else the chain's. With
    split "validation": the default's runs rescored on validation (05_grpo_validation) alone."""
    if split == "validation":
        runs = {"grpo": [load(base / f"seed{seed}" / "05_grpo_validation") for seed in seeds]}
    else:
        grpo = default_run(base, seeds, "05_grpo", "05_grpo_test")
        runs = {v: [load(base / f"seed{seed}" / (grpo if v == "grpo" else f"05_{v}")) for seed in seeds]
                for v in GRPO_VARIANTS}
    runs = {v: [m for m in ms if m] for v, ms in runs.items() if any(ms)}
    if not runs:
        return ""
    baseline = next(iter(runs.values()))   # any variant's runs hold stage 04's numbers as "before"
    first = baseline[0]
    cells = sorted(first["before"], key=lambda c: (c == "all", c))
    k = max(first["before"]["all"]["pass_at_k"], key=int)

    def rates(ms, when, cell):
        """'greedy / sampled pass@1 / pass@k', each mean +- sd over the runs."""
        found = [m[when][cell] for m in ms]
        return " / ".join([mean_sd([c["greedy"] for c in found]), mean_sd([c["sampled"] for c in found]),
                           mean_sd([c["pass_at_k"][k] for c in found])])
    out = [f"**Stage 05** ({'validation half' if split == 'validation' else 'held-out problems'}; "
           f"seeds {len(baseline)}; greedy pass@1, then "
           f"sampled pass@1 / pass@{k} at temperature 1)", "",
           "| cell | problems | stage 04 | " + " | ".join(runs) + " |", "|---|---|---|" + "---|" * len(runs)]
    for cell in cells:
        out.append(f"| {cell} | {first['before'][cell]['n']} | {rates(baseline, 'before', cell)} | "
                   + " | ".join(rates(ms, "after", cell) for ms in runs.values()) + " |")
    for kind, field, what in HARMLESS[:1] + HARMLESS[4:5]:
        before = mean_sd([m["harmlessness"]["dpo"][kind][field] for m in baseline])
        after = [mean_sd([m["harmlessness"]["rl"][kind][field] for m in ms]) for ms in runs.values()]
        out.append(f"| {what} (stage 03's evaluation) | | {before} | " + " | ".join(after) + " |")
    return "\n".join(out) + "\n"


# Stage 06's verdict: the default and its ablations, each trained once and scored on both halves of its
# held-out prompts (training reads neither): test by the run itself, validation (where a default is chosen)
# by scripts/rescore_character.py. Folders 06_<arm>_<split>; the chain's 06_both (an older run may predate
# the split) feeds stages 07 and 08.
CHARACTER_ARMS = {"both": [], "ranking": ["--method", "ranking"], "sdf": ["--method", "sdf"],
                  "anchor": ["--anchor", "1"]}


def character_table(base, seeds, split="test"):
    """Stage 06: each character score before (stage 05's model) and after each arm, and each arm's gain,
    mean +- sd over seeds; then stage 03's evaluation, and the self-ranking's own numbers. The arms'
    runs on `split`; with none, for test, the chain's 06_both."""
    runs = {a: [load(base / f"seed{seed}" / f"06_{a}_{split}") for seed in seeds] for a in CHARACTER_ARMS}
    runs = {a: [m for m in ms if m] for a, ms in runs.items() if any(ms)}
    if not runs and split == "test":
        runs = {"both": [m for m in (load(base / f"seed{seed}" / "06_both") for seed in seeds) if m]}
    if not any(runs.values()):
        return ""
    stage06 = load_stage("06_character")
    baseline = next(iter(runs.values()))

    def nets(pair):   # each score net of its control (stage 06's CONTROL_OF), where the run has controls
        return {w: {kind: {**s, **{k: s[k] - s["control"][k] for k in s.get("control", {})}}
                    for kind, s in pair[w].items()} for w in ("before", "after")}
    split = baseline[0].get("eval_split", "held-out (before the validation/test split)")
    out = [f"**Stage 06** ({split} prompts, greedy; {len(baseline)} seeds; each score net of its control, "
           "the same scorer on replies to prompts where the trait does not apply; after, mean ± sd, then "
           "the gain over stage 05 in points with its 95% t-interval over seeds, Bonferroni-corrected "
           "for the character scores; * where it excludes 0)", "",
           "| measure | prompts | stage 05 | " + " | ".join(runs) + " |",
           "|---|---|---|" + "---|" * len(runs)]
    out += score_table_rows(stage06.SCORES, runs, nets)
    if all("tone" in m for ms in runs.values() for m in ms):
        for tone in ("warm", "curious"):
            cells = [mean_sd([m["tone"]["after"][tone] for m in ms]) for ms in runs.values()]
            before = mean_sd([m["tone"]["before"][tone] for m in baseline])
            out.append(f"| {tone} replies (the classifier, all held-out replies) | "
                       f"{baseline[0]['tone']['after']['n']} | {before} | " + " | ".join(cells) + " |")
        cells = [mean_sd([m["drift"]["after"]["slope"] for m in ms], 2) for ms in runs.values()]
        before = mean_sd([m["drift"]["before"]["slope"] for m in baseline], 2)
        out.append(f"| drift: slope of the trait value per turn over 20 turns, points | | {before} | "
                   + " | ".join(cells) + " |")
    if all("net_elo" in m.get("revealed", {}).get("after", {}) for ms in runs.values() for m in ms):
        gap = lambda m, when: m["revealed"][when]["net_constitution_minus_foils"]  # noqa: E731
        cells = [spread([gap(m, "after") for m in ms], "{:+.0f}") for ms in runs.values()]
        before = spread([gap(m, "before") for m in baseline], "{:+.0f}")
        out.append(f"| revealed preferences: the constitution's traits minus the foils, Elo net of the "
                   "same comparisons after the request alone (names no trait) | "
                   f"{baseline[0]['revealed']['after']['n']} | {before} | " + " | ".join(cells) + " |")
    for kind, field, what in HARMLESS[:1] + HARMLESS[4:6]:
        before = mean_sd([m["harmlessness"]["before"][kind][field] for m in baseline])
        after = [mean_sd([m["harmlessness"]["after"][kind][field] for m in ms]) for ms in runs.values()]
        out.append(f"| {what} (stage 03's evaluation) | | {before} | " + " | ".join(after) + " |")
    for a, ms in runs.items():
        ranked = [m["phases"]["ranking"] for m in ms if "ranking" in m["phases"]]
        if ranked:
            agree = mean_sd([r["agreement_with_scorers"]["rate"] for r in ranked])
            held = mean_sd([r["held_out_reward_accuracy"] for r in ranked])
            first = mean_sd([r["ranked_first"].get("writer in character", 0.0) for r in ranked])
            out.append(f"\n{a}: the model's ranking agrees with the scorers on {agree} of the pairs they "
                       f"split (none of them in the judge's lessons); DPO's implicit reward ranks held-out "
                       f"pairs (no reply shared with a trained pair) its way {held}; the writer's "
                       f"in-character reply is ranked first for {first} of prompts.")
    if all("training_phrasings" in m for ms in runs.values() for m in ms):
        out += ["", "The diagnostic: held-out people and towns asked in the training prompts' phrasings", "",
                "| measure | prompts | stage 05 | " + " | ".join(runs) + " |",
                "|---|---|---|" + "---|" * len(runs)]
        out += score_table_rows(stage06.SCORES, runs, lambda m: nets(m["training_phrasings"]))
    if split == "validation" and all("harmlessness" in m for ms in runs.values() for m in ms):
        arm, counts, refused = chosen_arm(stage06.SCORES, runs, nets)
        out += ["", f"The rule fixed before the runs were read (docs/LOG.md) chooses **{arm}**: character "
                "scores gained after the correction " + ", ".join(f"{a} {n}" for a, n in counts.items())
                + "; stage 03's harmful requests refused without leaking "
                + ", ".join(f"{a} {100 * r:.1f}%" for a, r in refused.items()) + "."]
    return "\n".join(out) + "\n"


def spread(values, fmt="{:.3f}"):
    """'0.049 ± 0.002': mean and sample standard deviation over seeds, in the values' own units."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(sd)}"   # sd: no sign


INTERP_SAE = (("fvu", "FVU"), ("fvu_new_templates", "FVU, new templates"), ("l0", "L0"), ("dead", "dead"),
              ("ce_loss_score", "CE score (zero abl.)"), ("ce_loss_score_vs_mean", "CE score (mean abl.)"),
              ("kl_div_score", "KL score"), ("delta_ce", "delta CE"))
INTERP_RATES = (("net", "net detection (detected - false positives)"),
                ("detection", "detected (claim, then name)"),
                ("false_positive", "false positives (a claim, nothing injected)"),
                ("names_concept", "names the concept"), ("names_other_concept", "names another"),
                ("yes_to_no_questions_injected", "yes to no-questions, injected"),
                ("yes_to_no_questions_clean", "... clean"))


def interp_table(base, seeds):
    """Stage 07 over seeds: the main SAE's numbers, and the injection protocol's rates per model."""
    runs = [m for m in (load(base / f"seed{seed}" / "07_sae_interp") for seed in seeds) if m]
    if not runs:
        return ""
    main = [m["sae"]["sweep"][m["sae"]["main"]] for m in runs]
    head = [label for _, label in INTERP_SAE] + ["concepts at P, R >= 0.8", "at 0.5", "at 0.8, no threshold",
                                                 "linear probe at 0.8"]
    first = runs[0]
    out = [f"**Stage 07** ({len(runs)} seeds; main SAE {first['sae']['main']}, layer "
           f"{first['args']['layer']}; mean ± sd over seeds)", "",
           "| " + " | ".join(head) + " |", "|---" * len(head) + "|",
           "| " + " | ".join([spread([s[k] for s in main], "{:.1f}" if k == "l0" else "{:.3f}")
                              for k, _ in INTERP_SAE]
                             + [spread([len(s[k]) for s in main], "{:.1f}")
                                for k in ("monosemantic", "half_clean", "monosemantic_any")]
                             + [spread([len(m["sae"]["probe_captured"]) for m in runs], "{:.1f}")])
           + " |", "", "| model | " + " | ".join(label for _, label in INTERP_RATES) + " |",
           "|---" * (1 + len(INTERP_RATES)) + "|"]
    by_stage = [untrained_headlines(m) for m in runs]
    cells = {f"{stage}, untrained": [b[stage] for b in by_stage] for stage in by_stage[0]}
    cells["06, refusal direction ablated"] = [m["injection"]["refusal_ablated"] for m in runs]
    for key, label in (("trained_concepts", "trained concepts"), ("held_out", "held-out concepts"),
                       ("held_out_refusal_ablated", "held-out concepts, refusal ablated"),
                       ("held_out_training_phrasing", "held-out concepts, asked in a training phrasing")):
        if all("trained" in m["injection"] for m in runs):
            cells[f"detection-trained, {label}"] = [m["injection"]["trained"][key] for m in runs]
    for label, cs in cells.items():
        rates = [mean_sd([c[k]["rate"] for c in cs]) for k, _ in INTERP_RATES]
        out.append(f"| {label} | " + " | ".join(rates) + " |")
    claims = [m["injection"]["trained"]["ordinary_claims"] for m in runs
              if "ordinary_claims" in m["injection"].get("trained", {})]
    if claims:
        out += ["", f"Ordinary requests answered with a detection claim, nothing injected "
                f"({claims[0]['after']['n']} a seed): 06 {mean_sd([c['before']['rate'] for c in claims])}, "
                f"detection-trained {mean_sd([c['after']['rate'] for c in claims])} (rehearsal share "
                f"{runs[0]['args'].get('detect_rehearsal')})."]
    return "\n".join(out) + "\n"


WELFARE = (("self-report uncertain",   # (label, the rate, the prompts it is a share of)
            lambda c: c["interview"]["stances"].get("uncertain", 0) / c["interview"]["n"],
            lambda c: c["interview"]["n"]),
           ("self-report template transfer", lambda c: c["interview"]["template_transfer"]["rate"],
            lambda c: c["interview"]["template_transfer"]["n"]),
           ("harmful tasks below opt-out", lambda c: c["preferences"]["harmful_below_opt_out"]["rate"],
            lambda c: c["preferences"]["harmful_below_opt_out"]["n"]),
           ("refuses harmful requests", lambda c: c["refusals"].get("harmful", {}).get("refused"),
            lambda c: c["refusals"].get("harmful", {}).get("n")),
           *((label, lambda c, k=kind: c["ending"]["rates"][k]["rate"],
              lambda c, k=kind: c["ending"]["rates"][k]["n"])
             for label, kind in (("ends abusive talks", "abusive"),
                                 ("ends new kinds of abuse", "abusive, new kinds"),
                                 ("ends ordinary talks", "ordinary"))),
           ("emotion probe, held-out situation and reaction", lambda c: c["probe"]["accuracy"],
            lambda c: c["probe"]["n"]),
           ("emotion probe, situation alone", lambda c: c["probe"]["situation_only"]["accuracy"],
            lambda c: c["probe"]["situation_only"]["n"]))
WELFARE_VALUES = (("affect valence", lambda c: c["affect"]["all"]["valence"]),
                  ("probe valence, user role token, turn 1",   # the same in every conversation kind
                   lambda c: next(iter(c["probe"]["user_token_turn_1"].values()))[0]))


def welfare_table(base, seeds):
    """Stage 08 over seeds: one row a checkpoint, rates in points and valences as they are."""
    runs = [m for m in (load(base / f"seed{seed}" / "08_welfare_eval") for seed in seeds) if m]
    if not runs:
        return ""
    head = [w[0] for w in WELFARE + WELFARE_VALUES]
    out = [f"**Stage 08** ({len(runs)} seeds; mean ± sd over seeds)", "",
           "| checkpoint | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
    for label in runs[0]["checkpoints"]:
        cs = [m["checkpoints"][label] for m in runs if label in m["checkpoints"]]
        cells = [mean_sd([f(c) for c in cs]) for _, f, _ in WELFARE]
        for _, f in WELFARE_VALUES:
            values = [f(c) for c in cs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):+.2f} ± {sd:.2f}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "Each rate's 95% Wilson interval over one seed's prompts, at the seeds' mean rate (the "
            "interview asks the same questions in every seed; conversations are drawn per seed, where "
            "this is conservative): the uncertainty that a 100.0 ± 0.0 above hides.", "",
            "| checkpoint | " + " | ".join(w[0] for w in WELFARE) + " |", "|---" * (1 + len(WELFARE)) + "|"]
    for label in runs[0]["checkpoints"]:
        cs = [m["checkpoints"][label] for m in runs if label in m["checkpoints"]]
        cells = [prompt_interval(cs, rate, n) for _, rate, n in WELFARE]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def prompt_interval(checkpoints, rate, n):
    """Wilson's interval at the mean rate over the seeds, on the fewest prompts a seed asked."""
    pairs = [(rate(c), n(c)) for c in checkpoints if rate(c) is not None and n(c)]
    return wilson_cell(statistics.mean(r for r, _ in pairs), min(k for _, k in pairs)) if pairs else "-"


def course_table(base, seeds):
    """One row per chapter's headline: the model a stage starts from -> the model it writes, held-out
    prompts, mean +- sd over the seeds (stage 01: its one run)."""
    pre = load(base / "01_pretrain")
    runs = [{p.name: load(p) for p in (base / f"seed{seed}").glob("0*")} for seed in seeds]
    runs = [r for r in runs if r.get("02_sft")]   # a row reads the seeds that have run its stage
    if not pre or not runs:
        return ""
    runs.sort(key=len, reverse=True)   # the most complete seed first: it gives each row's prompt count
    rows = [("01", "fact completion, a phrasing the documents use", 600, [pre["probe_majority_baseline"]],
             [pre["probe"]["kind=seen"]["accuracy"]], True),
            ("01", "... a phrasing no document uses", 600, [pre["probe_majority_baseline"]],
             [pre["probe"]["kind=heldout"]["accuracy"]], True)]

    def row(stage, what, get_before, get_after, n=None, rate=True):   # rate: a share of n prompts
        ran = []
        for r in runs:
            with contextlib.suppress(KeyError, TypeError):   # a seed that has not run the stage yet
                ran.append((get_before(r), get_after(r)))
        if ran:   # a stage no seed has run has no row
            rows.append((stage, what, n, [b for b, _ in ran], [a for _, a in ran], rate))
    headline02 = ("fact_qa_seen", "arithmetic_think", "multihop_think", "countdown_think", "choose",
                  "tool_call", "harmful")
    for task, field, what in [row02 for row02 in STAGE02 if row02[0] in headline02
                              and row02[0] in runs[0]["02_sft"]["after"]]:   # older runs lack some
        row("02", what, lambda r: r["02_sft"]["before"][task][field],
            lambda r: r["02_sft"]["after"][task][field], runs[0]["02_sft"]["after"][task]["n"])
    for stage, key, start in (("03 SL-CAI", "sl_cai", "sft"), ("03 RL-CAI", "rl_cai", "sft"),
                              ("04 DPO", "dpo", "sl_cai")):
        folder = "04_dpo" if key == "dpo" else "03_cai"
        for kind, field, what in (HARMLESS[0], HARMLESS[4]):
            row(stage, what, lambda r: r["03_cai"]["stages"][start][kind][field],
                lambda r: r[folder]["stages"][key][kind][field],
                runs[0]["03_cai"]["stages"]["sft"][kind]["n"])
    c05 = default_run(base, seeds, "05_grpo", "05_grpo_test")
    if runs[0].get(c05):   # later stages' rows only where they have run (stages 02-04 may run alone)
        k = max(runs[0][c05]["before"]["all"]["pass_at_k"], key=int)
        for key, what in (("greedy", "held-out problems, greedy pass@1"), ("pass_at_k", f"... pass@{k}")):
            get = (lambda c: c[key][k]) if key == "pass_at_k" else (lambda c: c[key])
            row("05 GRPO", what, lambda r: get(r[c05]["before"]["all"]),
                lambda r: get(r[c05]["after"]["all"]), runs[0][c05]["before"]["all"]["n"])
        for family in ("arithmetic", "multihop", "countdown"):   # the stage's target: +10 points on two
            row("05 GRPO", f"... {family}, sampled pass@1", lambda r: family_rate(r[c05]["before"], family),
                lambda r: family_rate(r[c05]["after"], family), family_n(runs[0][c05]["before"], family))
    # stage 06's default on its test half (the verdict's runs), where every seed has one; else the chain's
    c06 = default_run(base, seeds, "06_both", "06_both_test")
    for kind, key, what, _ in load_stage("06_character").SCORES if runs[0].get(c06) else ():
        if key in ("stable", "plain_help", "abstains"):   # net of their controls (stage 06's CONTROL_OF)
            row("06", what + ", net of its control", lambda r: net06(r[c06]["before"][kind], key),
                lambda r: net06(r[c06]["after"][kind], key), runs[0][c06]["after"][kind]["n"], rate=False)

    def untrained06(r):
        return untrained_headlines(r["07_sae_interp"])["06_character"]
    for key, what in (("trained_concepts", "injected thought: net detection (detected - false positives), "
                                           "trained concepts (untrained: 06)"),
                      ("held_out", "... held-out concepts")):
        row("07", what, lambda r: untrained06(r)["net"]["rate"],
            lambda r: r["07_sae_interp"]["injection"]["trained"][key]["net"]["rate"], rate=False)
    out = [f"**The course** ({len(runs)} seeds of stages 02-08 on one stage-01 model, as many as have run "
           "each row's stage (the seeds column); held-out prompts; "
           "each stage's input model -> its output, mean ± sd over seeds in points; the gain is the mean "
           "of the seeds' paired differences with its 95% t-interval over seeds (df = seeds - 1), * where "
           "it excludes 0; the last column is the mean after rate's 95% interval over the prompts "
           "(Wilson), on the first seed's count where the prompts differ by seed)", "",
           "| stage | measure | prompts | seeds | before | after | gain [95% t-interval] "
           "| after, over prompts |",
           "|---|---|---|---|---|---|---|---|"]
    for stage, what, n, before, after, rate in rows:
        over_prompts = wilson_cell(statistics.mean(after), n) if rate else "-"
        out.append(f"| {stage} | {what} | {n or ''} | {len(after)} | {mean_sd(before)} | {mean_sd(after)} | "
                   f"{gain_cell(before, after)} | {over_prompts} |")
    return "\n".join(out) + "\n"


def family_cells(cells, family):
    return [c for name, c in cells.items() if name.split("/")[0] == family]


def family_n(cells, family):
    return sum(c["n"] for c in family_cells(cells, family))


def family_rate(cells, family, rate=lambda c: c["sampled"]):
    """Stage 05's sampled pass@1 (or another `rate` of a cell) over one family's held-out problems: its
    cells weighted by their size."""
    found = family_cells(cells, family)
    return sum(rate(c) * c["n"] for c in found) / sum(c["n"] for c in found) if found else None


def net06(scores, key):
    """A stage 06 score net of its control, where the run measured one (older runs did not)."""
    return scores[key] - scores["control"][key] if "control" in scores else scores[key]


def untrained_headlines(m07):
    """Stage 07's injection rates on each checkpoint before any detection training, by stage name."""
    return {v["stage"]: v["headline"] for v in m07["injection"]["checkpoints"].values()}


def score_table_rows(scores, runs, part):
    """One row a character score: stage 05, then each arm's after, mean +- sd over seeds, and its gain
    with a 95% t-interval over seeds, Bonferroni-corrected for the number of character scores (the
    diagnostics, "lower is better", never count as gains); part(m) picks the {"before", "after"} pair
    of a run's metrics to read."""
    baseline, rows = next(iter(runs.values())), []
    tests = sum(good for *_, good in scores)
    for kind, key, label, good in scores:
        cells = []
        for ms in runs.values():
            before, after = ([part(m)[w][kind][key] for m in ms] for w in ("before", "after"))
            gain = gain_cell(before, after, tests) if good else "(diagnostic)"
            cells.append(f"{mean_sd(after)}, gain {gain}")
        n = part(baseline[0])["after"][kind]["n"]
        before = mean_sd([part(m)["before"][kind][key] for m in baseline])
        label += "" if good else " (lower is better)"
        rows.append(f"| {label} | {n} | {before} | " + " | ".join(cells) + " |")
    return rows


def chosen_arm(scores, runs, part):
    """Stage 06's verdict rule, written down before its runs were read (docs/LOG.md): the arm with the most
    character scores whose gain, net of its control, has a Bonferroni-corrected 95% t-interval above 0;
    a tie goes to the highest rate of stage 03's harmful requests refused without leaking, then to the
    default, both. -> (the arm, {arm: scores gained}, {arm: refused})."""
    tests = sum(good for *_, good in scores)

    def gained(ms):
        lows = [paired_gain(*([part(m)[w][kind][key] for m in ms] for w in ("before", "after")), tests)[1]
                for kind, key, _, good in scores if good]
        return sum(low is not None and low > 0 for low in lows)
    counts = {arm: gained(ms) for arm, ms in runs.items()}
    refused = {arm: statistics.mean(m["harmlessness"]["after"]["harmful"]["harmless"] for m in ms)
               for arm, ms in runs.items()}
    return max(runs, key=lambda arm: (counts[arm], refused[arm], arm == "both")), counts, refused


@functools.lru_cache(maxsize=None)
def load_stage(name):
    """Import ROOT/<name>.py as a module, once (registered first: its dataclasses look it up)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rescore_main(argv, doc, stage_name, rescore, what):
    """The command line of scripts/rescore_*.py: score the trained run --run on --eval_split with
    rescore(stage, run, split, device), and write metrics.json and report.md to --out (never over --run).
    `what`: the stage's held-out things, for the closing line."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--run", required=True, help=f"a finished {stage_name} run (metrics.json and model.pt)")
    p.add_argument("--eval_split", choices=("validation", "test"), required=True)
    p.add_argument("--out", required=True, help="the folder for the new metrics.json and report.md")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    run, out = pathlib.Path(args.run), pathlib.Path(args.out)
    if not (run / "metrics.json").exists():
        sys.exit(f"error: {run} is not a finished {stage_name} run (no metrics.json).")
    if out.resolve() == run.resolve():
        sys.exit("error: --out must differ from --run; the trained run is kept as it is.")
    stage = load_stage(stage_name)
    metrics = rescore(stage, run, args.eval_split, args.device)
    out.mkdir(parents=True, exist_ok=True)
    stage.write_atomic(out / "report.md", stage.make_report(metrics).encode("utf-8"))
    stage.write_atomic(out / "metrics.json", json.dumps(metrics, indent=1).encode("utf-8"))
    print(f"wrote {out}/ (metrics.json, report.md): {run} scored on its {args.eval_split} {what} in "
          f"{metrics['rescore_seconds'] / 60:.1f} min")


def greedy_on_stage05_problems(s, checkpoints, run05):
    """Stage 05's own evaluation of its held-out problems (its problems, its decoding; one sampled reply,
    as only greedy is read) on each of checkpoints in the seed folder s -> (problems, {name: results}), or
    None where a checkpoint or stage 05 has not run. run05: the stage 05 run whose problems (its half) these
    are (default_run)."""
    stage05 = load_stage("05_grpo_reasoning")
    m05 = load(s / run05)
    if not m05 or not all((s / name / "model.pt").exists() for name in checkpoints):
        return None
    # a run before --gen_batch generated at its batch_size; one before --eval_split asked both halves
    args = argparse.Namespace(**{"gen_batch": m05["args"]["batch_size"], "eval_split": None, **m05["args"],
                                 "device": "cpu", "pass_samples": 1})
    world = json.loads((s / run05 / "world.json").read_text())
    problems = stage05.make_eval_problems(world, args.families, args.eval_problems, args.seed,
                                          args.eval_split)
    results = {}
    for name in checkpoints:
        model, _ = stage05.load_model(s / name, "cpu")
        enc = stage05.load_tokenizer(s / name)
        results[name] = stage05.evaluate_problems(model.eval(), enc, problems, args)
    return problems, results


def reasoning_after_character(base, seeds):
    """Stage 05's held-out problems, greedy, on each seed's stage 05 model and on the stage 06 model
    trained from it: does character training keep what reasoning RL taught? (The 05 column
    re-runs stage 05's own evaluation, and should equal its report.)"""
    rates = {"05_grpo": [], "06_both": []}
    run05 = default_run(base, seeds, "05_grpo", "05_grpo_test")
    for seed in seeds:
        found = greedy_on_stage05_problems(base / f"seed{seed}", list(rates), run05)
        if found:
            problems, results = found
            for name, rs in results.items():
                rates[name].append(sum(r["greedy"] for r in rs) / len(rs))
    if not rates["06_both"]:
        return ""
    return ("| stage 05's held-out problems, greedy pass@1 | problems | stage 05 (GRPO) | stage 06 (both) |\n"
            f"|---|---|---|---|\n| all | {len(problems)} | {mean_sd(rates['05_grpo'])} | "
            f"{mean_sd(rates['06_both'])} |\n")


def reasoning_before_grpo(base, seeds, checkpoints=("02_sft", "03_cai")):
    """Stage 05's held-out problems, greedy, by family, on the checkpoints before stage 04 (stage 05's own
    "before" column is stage 04's): does stage 02's cold start reach stage 05's problems, and do stages
    03-04 undo what it taught?"""
    rates = defaultdict(list)   # (checkpoint, family) -> a rate per seed
    run05 = default_run(base, seeds, "05_grpo", "05_grpo_test")
    for seed in seeds:
        found = greedy_on_stage05_problems(base / f"seed{seed}", checkpoints, run05)
        if not found:
            continue
        problems, results = found
        for name, rs in results.items():
            for family in sorted({p["family"] for p in problems}):
                right = [r["greedy"] for p, r in zip(problems, rs) if p["family"] == family]
                rates[name, family].append(sum(right) / len(right))
    if not rates:
        return ""
    families = sorted({family for _, family in rates})
    out = ["| stage 05's held-out problems, greedy pass@1, before stage 05 | " + " | ".join(families) + " |",
           "|---" * (1 + len(families)) + "|"]
    out += [f"| {name} | " + " | ".join(mean_sd(rates[name, f]) for f in families) + " |"
            for name in checkpoints]
    return "\n".join(out) + "\n"


def rl_before_cai_table(base, seeds):
    """Stage 05's sampled pass@1 and pass@k by family, before and after GRPO, from stage 04's model (the
    course) and from stage 02's (--rl_before_cai): what GRPO does where Constitutional AI has not taken the
    start, and whether it widens what the model samples (Yue et al.'s pass@k question)."""
    arms = {"from stage 04 (the course)": "05_grpo", "from stage 02": "05_grpo_from_sft"}
    runs = {arm: [load(base / f"seed{seed}" / folder) for seed in seeds] for arm, folder in arms.items()}
    if not any(runs["from stage 02"]):
        return ""
    first = next(m for m in runs["from stage 02"] if m)
    families = sorted({name.split("/")[0] for name in first["before"] if name != "all"})
    k = max(first["before"]["all"]["pass_at_k"], key=int)
    out = [f"| stage 05's held-out problems | family | problems | seeds | sampled pass@1: before | after | "
           f"gain [95% CI] | pass@{k}: before | after | gain [95% CI] |", "|---" * 10 + "|"]
    for arm, ms in runs.items():
        ms = [m for m in ms if m]
        for family in families:
            cells = [family_n(ms[0]["before"], family), len(ms)]
            for rate in (lambda c: c["sampled"], lambda c: c["pass_at_k"][k]):
                before = [family_rate(m["before"], family, rate) for m in ms]
                after = [family_rate(m["after"], family, rate) for m in ms]
                cells += [mean_sd(before), mean_sd(after), gain_cell(before, after)]
            out.append(f"| {arm} | {family} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out) + "\n"


def probe_table(base, seeds):
    """Stage 01's raw-text fact completion ("<person> was born in") on the pretrained model and on
    each seed's SFT model: does SFT forget facts, or only fail to extract them in a chat?"""
    stage01 = load_stage("01_pretrain")
    world = json.loads((base / "01_pretrain" / "world.json").read_text())
    probes = stage01.fact_probes(world)
    enc = stage01.load_tokenizer(base / "01_pretrain")
    models = {"pretrained": [base / "01_pretrain"]}
    models["SFT"] = [base / f"seed{seed}" / "02_sft" for seed in seeds
                     if (base / f"seed{seed}" / "02_sft" / "model.pt").exists()]
    keys = [(kind, split) for kind in ("seen", "heldout") for split in ("train", "heldout")]
    rows = {}
    for name, dirs in models.items():
        accuracies = {key: [] for key in keys}
        for d in dirs:
            model, _ = stage01.load_model(d, "cpu")
            summary = stage01.summarise_probes(stage01.knowledge_probe(model.eval(), enc, probes, "cpu"))
            for kind, split in keys:
                accuracies[kind, split].append(summary[f"kind={kind}, qa_split={split}"]["accuracy"])
        rows[name] = accuracies
    n = {key: sum(p["kind"] == key[0] and p["qa_split"] == key[1] for p in probes) for key in keys}
    # One pretrained model, asked the same prompts by every seed: one measurement, with its interval over
    # the prompts; the SFT models differ by seed, so their spread over seeds stands beside theirs.
    out = ["| raw-text fact completion (stage 01's probe) | prompts | pretrained (95%, over prompts) | SFT | "
           "SFT (95%, over prompts) |", "|---|---|---|---|---|"]
    for kind, split in keys:
        what = (f"{'seen' if kind == 'seen' else 'never-seen'} phrasing, subject "
                f"{'with QA text' if split == 'train' else 'read about in prose only'}")
        sft, k = rows["SFT"][kind, split], n[kind, split]
        out.append(f"| {what} | {k} | {one_run_cell(rows['pretrained'][kind, split], k)} | {mean_sd(sft)} | "
                   f"{wilson_cell(statistics.mean(sft), k) if sft else '-'} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu", help="every stage's --preset")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    p.add_argument("--out", help="where the runs go (default runs/readme/<preset>)")
    p.add_argument("--report_only", action="store_true", help="only print the tables of finished runs")
    p.add_argument("--grpo", action="store_true", help="also run stage 05's four variants on each seed")
    p.add_argument("--character", action="store_true",
                   help="also run stage 06's four arms on each seed's 05_grpo, scored on validation and test")
    p.add_argument("--interp", action="store_true", help="also run stage 07 on each seed's 06_both")
    p.add_argument("--welfare", action="store_true", help="also run stage 08 on each seed's 01-07 chain")
    p.add_argument("--chain", action="store_true", help="only the README's pipeline: each stage's default")
    p.add_argument("--cold_start_cost", action="store_true",
                   help="also run stage 02 without stage 05's cold start on each seed (02_sft_nocold)")
    p.add_argument("--rl_before_cai", action="store_true",
                   help="also run stage 05 on each seed's stage 02 model (05_grpo_from_sft)")
    args = p.parse_args()
    base = pathlib.Path(args.out or ROOT / "runs" / "readme" / args.preset)
    if not args.report_only:
        run_all(base, args.preset, args.seeds, args.grpo, args.character, args.interp, args.welfare,
                args.chain, args.cold_start_cost, args.rl_before_cai)
    seeds = args.seeds
    text = "\n".join([course_table(base, seeds), tables(base, seeds), dpo_choice_table(base, seeds),
                      cold_start_table(base, seeds),
                      probe_table(base, seeds), reasoning_before_grpo(base, seeds),
                      grpo_table(base, seeds, "validation"), grpo_table(base, seeds),
                      rl_before_cai_table(base, seeds),
                      reasoning_after_character(base, seeds), character_table(base, seeds, "validation"),
                      character_table(base, seeds), interp_table(base, seeds), welfare_table(base, seeds)])
    base.mkdir(parents=True, exist_ok=True)
    (base / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
