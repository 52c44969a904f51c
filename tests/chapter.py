"""Read a stage as a chapter: its sections, its size, and how it differs from another stage.

Every stage file has the same numbered skeleton (README, "How to read a stage, and fork one"):

    docstring, 1. Configuration, 2. The idea, 3. Data, 4. Training, 5. Evaluation, 6. Main,
    7. Report, Appendix A (this stage's data generators), Appendix B (shared code, copied verbatim)

The body is everything above Appendix A: the part a reader reads and a fork edits.

    python tests/chapter.py                          # a table: lines, body, appendices, longest function
    python tests/chapter.py 02_sft.py 04_dpo.py      # diff of two bodies, appendices stripped
"""
import ast
import difflib
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ["1. Configuration", "2. The idea", "3. Data", "4. Training", "5. Evaluation", "6. Main",
            "7. Report", "Appendix A", "Appendix B"]
RULE = "# " + "=" * 85


def stage_files(root=ROOT):
    return sorted(root.glob("0[0-9]_*.py"))


def section_starts(lines):
    """{section: 1-based line of its '# N. Title' heading} for the headings framed by rules."""
    starts = {}
    for i in range(1, len(lines) - 1):
        if lines[i - 1].rstrip() == RULE and lines[i + 1].rstrip() == RULE:
            for name in SECTIONS:
                if re.match(r"# " + re.escape(name) + r"(:|$)", lines[i].rstrip()):
                    starts[name] = i + 1
    return starts


def body(path):
    """The lines from the docstring to the end of section 7 (the rule above Appendix A excluded)."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    end = section_starts(lines).get("Appendix A", len(lines) + 1) - 2
    return lines[:end]


def functions(path):
    """[(length in lines, name, first line)] of every function and method, longest first."""
    tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"))
    found = [(node.end_lineno - node.lineno + 1, node.name, node.lineno) for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return sorted(found, reverse=True)


def stats(path):
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    starts = section_starts(lines)
    n_body = len(body(path))
    longest, name, _ = functions(path)[0]
    main = next((n for n, fn, _ in functions(path) if fn == "main"), None)
    return {"file": pathlib.Path(path).name, "lines": len(lines), "body": n_body,
            "appendix A": starts.get("Appendix B", len(lines) + 1) - starts.get("Appendix A", len(lines) + 1),
            "appendix B": len(lines) + 1 - starts.get("Appendix B", len(lines) + 1),
            "section 2 at": starts.get("2. The idea"), "main": main,
            "longest function": f"{name} ({longest})",
            "over 110": sum(len(line) > 110 for line in lines)}


def print_table(paths):
    from test_layout import BODY_BUDGET   # here, not at the top: test_layout imports this module
    rows = [stats(p) for p in paths]
    for r in rows:
        r["body"] = f"{r['body']} of {BODY_BUDGET.get(r['file'], 500)}"
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        a, b = (ROOT / name for name in sys.argv[1:])
        sys.stdout.writelines(difflib.unified_diff([line + "\n" for line in body(a)],
                                                   [line + "\n" for line in body(b)], a.name, b.name))
    else:
        print_table(stage_files())
