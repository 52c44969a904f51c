"""Every stage reads as a chapter with the same skeleton (README, "How to read a stage, and fork one").

Checked here, for every NN_name.py: the numbered sections in order; the shared blocks in Appendix
B, in one fixed order, opened by an index of what the stage calls (a block may instead sit in the
body of the stage it originates in); no copied definition the stage never uses; main short; the
body within its budget; no line over 110 characters.
"""
import ast
import pathlib
import re

import pytest

from chapter import RULE, SECTIONS, body, functions, section_starts, stage_files
from test_shared_blocks import find_blocks

BLOCK_ORDER = ["flags", "tokenizer", "model", "checkpoint", "finite", "steplog", "save", "precision", "sampling", "chat", "grading", "stats",
               "judging", "choice", "replies", "halves", "pairs", "reference", "worldlabel", "feedback", "rehearsal",
               "heldout", "countdown", "injection", "arithmetic"]
BODY_BUDGET = {"01_pretrain.py": 975, "02_sft.py": 712, "03_constitutional_ai.py": 950,  # lines; others 500
               # 02: 700 until (issue 33, +12) --eval_split: its held-out content halved into validation
               # and test, twice the items drawn so that each half keeps about --n_eval a task.
               "04_dpo.py": 505,              # 04 (issue 33, +5): --eval_split, stage 03's halves.
               # 01: 700 until its subject moved from its appendices into its body (STYLE.md, "Two
               # refinements"): the `model` block, 182 lines with its markers, into section 2, and the
               # BPE trainer (SPLIT_PATTERN to make_encoding), 87 lines, into section 3, each after two
               # blank lines: 700 + 182 + 87 + 2 * 2 = 973; + 2 for the pretraining page that writes no
               # product stage 05 evaluates on (held out by content at every boundary) = 975.
               "05_grpo_reasoning.py": 638,   # 03, 05 and 06 each hold several methods (05: four, the
                                              # accessors that make section 2 their one seam, pass@k and
               "06_character.py": 1014,       # the replies it keeps for rehearsal; 06: two, their combination,
                                              # a dozen measures, a classifier, revealed preferences
                                              # (Bradley-Terry over traits), the judge's cold start, the
                                              # rehearsal of stage 05's replies and stage 02's facts and
                                              # the anchor to stage 05 on stage 03's requests (925), and
                                              # (issue 32, +61) every score net of its control, template
                                              # transfer apart, and the constant-reply table in the report,
                                              # and (+12) ranked pairs held out by content: held-out prompts'
                                              # replies in another voice, pairs sharing a reply with a
                                              # trained pair dropped, judge lessons apart from every ranked
                                              # request and reply; and (+9) revealed preferences net of a
                                              # control frame naming no trait (a second likelihood pass
                                              # over the same pairs, its Elo, and the net in the report);
                                              # and (+7) evaluation on a validation or a test half
                                              # (--eval_split), stage 03's requests halved too; 05 (+3)
                                              # its own --eval_split, halving the held-out content; (+2)
                                              # harmlessness after RL on the half stage 04 scored;
               "07_sae_interp.py": 1225,      # 07: three experiments: an SAE sweep with labels (at fitted
                                              # thresholds) and a probe ceiling, steering two ways,
                                              # injection with four controls,
                                              # training (with rehearsal of ordinary replies) and an ablation;
                                              # 1125 until issue 33 added, net of what it saved: a grader
                                              # that reads denials and hedges clause by clause, the refusal
                                              # direction ablated at every layer, net detection with
                                              # Newcombe's interval as the headline of console, report and
                                              # plot, and concepts counted on distinct test sentences;
                                              # and (issue 35, +1) --gen_batch, the replies generated at once
                                              # apart from the scoring batch (05 and 06 paid for theirs with
                                              # the autocast blocks that generate made redundant; 07 had none);
                                              # and issue 35's GPU paths (+38): a sparse TopK decode,
                                              # SAE steps in TF32 with no host read a step, batches drawn
                                              # on the device; and (+4) a held-out FVU curve per dictionary;
               "08_welfare_eval.py": 1013}    # 08: six measures with their controls on every checkpoint, a
                                              # trained affect scorer and probe, and the system card's text;
                                              # 950 until issue 33's answer keys: a situation-only probe test
                                              # and the claim it licenses, <|user|>-token readings by kind
                                              # at two turns, and a self-report bank disjoint from training
                                              # with template transfer reported apart: +49); and (issue 35,
                                              # +2) --gen_batch, as 07's, and its own line in the cpu preset;
                                              # (issue 33, +12) the probe's guess and a copy's own repeats as
                                              # functions of their own, each with a hand-computed test
MAIN_BUDGET = 60
# The budgets above are the maintainers' (CONTRIBUTING.md). The suite allows this many lines more, so that a
# student's fork, a new method added to section 2 as the course's exercises ask (RLOO, SimPO: 10-30 lines),
# never fails it; `python tests/chapter.py` prints each body beside its budget for a review to read.
FORK_ALLOWANCE = 30
STAGES = stage_files()
ROOT_DIR = STAGES[0].parent


def framed_headings(lines):
    """Every '# ...' line framed by two rule lines, as (1-based line, text)."""
    return [(i + 1, lines[i]) for i in range(1, len(lines) - 1)
            if lines[i - 1].rstrip() == RULE and lines[i + 1].rstrip() == RULE]


def index_entries(lines, appendix_b):
    """The '#   block  names' lines under '# This stage calls:' at the top of Appendix B."""
    entries, reading = [], False
    for line in lines[appendix_b:]:
        if line.startswith("# This stage calls:"):
            reading = True
        elif reading and (m := re.match(r"#   (\w+)\s", line)):
            entries.append(m[1])
        elif reading and re.match(r"#\s{5,}\S", line):
            continue   # the names of the block above, continued
        elif reading:
            break
    return entries


def misplaced_blocks(path):
    """Shared blocks outside Appendix B, except a block in the body of its origin stage. The origin
    is where a block is written and edited, and where it may be the chapter's subject: stage 01
    teaches the Transformer, so its `model` block is read in 01's section 2 (STYLE.md, "Two
    refinements"). A copy, in any other stage, is reference and belongs in Appendix B, where a
    reader knows not to edit it (`--fix` would revert the edit); in a body it would hide the stage's
    own idea among code that is not. Appendix A holds generators, never a shared block."""
    starts = section_starts(path.read_text(encoding="utf-8").splitlines())
    return [name for name, (origin, start, _, _) in find_blocks(path).items()
            if start < starts["Appendix B"] and not (start < starts["Appendix A"] and origin == path.name)]


def unused_copied_definitions(path):
    """Top-level names defined inside a block copied from another file that nothing else in this file
    refers to: a stage carries only the shared code it calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used_by = []   # (top-level node, names it reads)
    for node in tree.body:
        used_by.append((node, {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}))
    unused = []
    for name, (origin, start, end, _) in find_blocks(path).items():
        if origin == path.name:
            continue   # the origin is where a definition is written, not a copy of it
        for node in tree.body:
            if not start < node.lineno <= end:
                continue
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            else:
                defined = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for d in defined:
                if not any(d in names for other, names in used_by if other is not node):
                    unused.append(f"{name}.{d}")
    return unused


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_sections_in_order(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    found = [text for _, text in framed_headings(lines)]
    titles = [next((s for s in SECTIONS if re.match(r"# " + re.escape(s) + r"(:|$)", t)), t) for t in found]
    assert titles == SECTIONS, f"{path.name}: framed headings {found}"
    assert lines[0].startswith('"""Stage '), f"{path.name} must open with its chapter docstring"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_shared_blocks_sit_in_appendix_b_in_one_order_with_an_index(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    appendix_b = section_starts(lines)["Appendix B"]
    assert not misplaced_blocks(path), f"{path.name}: blocks outside Appendix B: {misplaced_blocks(path)}"
    blocks = sorted(find_blocks(path).items(), key=lambda item: item[1][1])
    names = [name for name, (_, start, _, _) in blocks if start > appendix_b]   # the rest: its origin's body
    assert names == [b for b in BLOCK_ORDER if b in names], f"{path.name}: blocks in order {names}"
    assert index_entries(lines, appendix_b) == names, f"{path.name}: Appendix B's index must list {names}"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_a_stage_carries_only_shared_code_it_uses(path):
    assert unused_copied_definitions(path) == []


def budget_problems(path, name=None):
    """What breaks the skeleton's budgets in the file at path (judged as the stage `name`): long lines, a long
    main, a body over its budget plus the fork allowance."""
    name = name or path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    problems = [f"line {i + 1} over 110 characters" for i, line in enumerate(lines) if len(line) > 110][:10]
    main = next(n for n, fn, _ in functions(path) if fn == "main")
    if main > MAIN_BUDGET:
        problems.append(f"main has {main} lines (at most {MAIN_BUDGET}: call phases)")
    n_body, budget = len(body(path)), BODY_BUDGET.get(name, 500)
    if n_body > budget + FORK_ALLOWANCE:
        problems.append(f"body (docstring to section 7) has {n_body} lines, budget {budget} "
                        f"(+{FORK_ALLOWANCE} for forks)")
    return problems


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_budgets(path):
    assert budget_problems(path) == [], path.name


def test_a_fork_of_thirty_lines_in_section_2_passes_the_budget(tmp_path):
    """The course's exercises add a method to section 2 (RLOO to 05, SimPO to 04): up to 30 lines must not
    fail the suite, even in the stage with the least room; one more over the allowance does."""
    name = min(STAGES, key=lambda p: BODY_BUDGET.get(p.name, 500) - len(body(p))).name
    lines = (ROOT_DIR / name).read_text(encoding="utf-8").splitlines()
    at = section_starts(lines)["2. The idea"] + 2
    room = BODY_BUDGET.get(name, 500) - len(body(ROOT_DIR / name))
    for added, ok in ((30, True), (room + FORK_ALLOWANCE + 1, False)):
        fork = tmp_path / name
        fork.write_text("\n".join(lines[:at] + ["# a student's line"] * added + lines[at:]) + "\n")
        assert (budget_problems(fork, name) == []) is ok, (added, budget_problems(fork, name))


def test_the_checks_catch_a_misplaced_or_unused_block(tmp_path):
    """The layout checks on a small file: an unused copied definition and a block out of order."""
    copy = ("# --- shared: grading (origin: 02_sft.py) ---\ndef is_refusal(t):\n    return False\n\n\n"
            "def mentions(t, p):\n    return True\n# --- end shared: grading ---\n")
    path = tmp_path / "09_demo.py"
    path.write_text("def main():\n    return is_refusal('x')\n\n\n" + copy)
    assert unused_copied_definitions(path) == ["grading.mentions"]
    path.write_text("def main():\n    return is_refusal('x') or mentions('x', 'y')\n\n\n" + copy)
    assert unused_copied_definitions(path) == []
    lines = [RULE, "# Appendix B: shared code", RULE, "# This stage calls:", "#   model   GPT",
             "#   chat    parse_reply", "", "x = 1"]
    assert index_entries(lines, 0) == ["model", "chat"]


def test_a_shared_block_may_sit_only_in_its_origin_stages_body(tmp_path):
    """A block in the body of the stage it originates in is allowed; the same block in another
    stage's body, or in Appendix A, is not."""
    block = ["# --- shared: grading (origin: 02_sft.py) ---", "def is_refusal(t):", "    return False",
             "# --- end shared: grading ---"]

    def misplaced_in(name, where):
        lines = []
        for title in ("2. The idea", "Appendix A: generators", "Appendix B: shared code"):
            lines += [RULE, f"# {title}", RULE] + (block if title.startswith(where) else [])
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return misplaced_blocks(path)
    assert misplaced_in("02_sft.py", "2.") == [] and misplaced_in("03_cai.py", "Appendix B") == []
    assert misplaced_in("03_cai.py", "2.") == ["grading"]        # a copy in another stage's body
    assert misplaced_in("02_sft.py", "Appendix A") == ["grading"]
    stage_01 = next(path for path in STAGES if path.name == "01_pretrain.py")
    body_01 = body(stage_01)   # what stage 01 teaches is in its body: the Transformer and the BPE trainer
    assert find_blocks(stage_01)["model"][1] < len(body_01)
    assert any(line.startswith("def train_bpe(") for line in body_01)


def test_body_strips_both_appendices():
    for path in STAGES:
        text = "\n".join(body(path))
        assert "# 7. Report" in text and "Appendix A" not in text.split("# 7. Report")[1]
        copies = [line for line in body(path) if line.startswith("# --- shared:")
                  and f"(origin: {path.name})" not in line]   # only an origin's own blocks (misplaced_blocks)
        assert not copies, f"{path.name}: copies in the body: {copies}"
