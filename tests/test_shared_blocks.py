"""Shared blocks must stay identical across stages.

Every stage is a self-contained file, so the code they all need (the model, checkpoint I/O,
the tokenizer loader, chat rendering, sampling) is repeated between markers:

    # --- shared: NAME (origin: 01_pretrain.py) ---
    ...
    # --- end shared: NAME ---

The origin named in the marker is the canonical copy. This test compares every copy with its
origin and names the first line that differs. `python tests/test_shared_blocks.py --fix`
rewrites every copy from its origin (the idea of Hugging Face's `make fix-copies`).
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
START = re.compile(r"^# --- shared: (?P<name>[\w-]+) \(origin: (?P<origin>[\w.]+)\)")
END = re.compile(r"^# --- end shared: (?P<name>[\w-]+) ---")


def find_blocks(path):
    """Return {name: (origin, first_body_line, end_line, body_lines)} for one file.

    Raises ValueError on unbalanced or nested markers, so a broken marker cannot hide a copy."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    blocks, open_name, open_origin, start = {}, None, None, 0
    for i, line in enumerate(lines):
        if m := START.match(line):
            if open_name is not None:
                raise ValueError(f"{path.name}:{i + 1}: block '{m['name']}' opens inside '{open_name}'")
            if m["name"] in blocks:
                raise ValueError(f"{path.name}:{i + 1}: block '{m['name']}' appears twice")
            open_name, open_origin, start = m["name"], m["origin"], i + 1
        elif m := END.match(line):
            if m["name"] != open_name:
                raise ValueError(f"{path.name}:{i + 1}: 'end shared: {m['name']}' without its start")
            blocks[open_name] = (open_origin, start, i, lines[start:i])
            open_name = None
    if open_name is not None:
        raise ValueError(f"{path.name}: block '{open_name}' is never closed")
    return blocks


def collect(root=ROOT):
    """{name: {filename: block}} over every top-level .py file of the project."""
    found = {}
    for path in sorted(root.glob("*.py")):
        for name, block in find_blocks(path).items():
            found.setdefault(name, {})[path.name] = block
    return found


def drift(root=ROOT):
    """A list of human-readable problems; empty when every copy matches its origin."""
    problems = []
    for name, copies in collect(root).items():
        origins = {block[0] for block in copies.values()}
        if len(origins) != 1:
            problems.append(f"block '{name}' names different origins: {sorted(origins)}")
            continue
        origin = origins.pop()
        if origin not in copies:
            problems.append(f"block '{name}' names origin {origin}, which does not contain it")
            continue
        reference = copies[origin][3]
        for filename, (_, start, _, body) in copies.items():
            if filename == origin or body == reference:
                continue
            for k, (a, b) in enumerate(zip(reference, body)):
                if a != b:
                    problems.append(f"{filename}:{start + k + 1}: block '{name}' differs from {origin}:\n"
                                    f"    origin: {a.rstrip()}\n    copy:   {b.rstrip()}")
                    break
            else:
                problems.append(f"{filename}: block '{name}' has {len(body)} lines, {origin} has {len(reference)}")
    return problems


def fix(root=ROOT):
    """Rewrite each copy of each block from its origin. Returns the files changed. One block at a
    time, collecting again after every rewrite: a rewrite moves the lines of the blocks below it."""
    changed = []
    while True:
        stale = []
        for copies in collect(root).values():
            origin = next(iter(copies.values()))[0]
            reference = copies[origin][3]
            stale += [(filename, start, end, reference) for filename, (_, start, end, body) in copies.items()
                      if filename != origin and body != reference]
        if not stale:
            return changed
        filename, start, end, reference = stale[0]
        path = root / filename
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[:start] + reference + lines[end:]), encoding="utf-8")
        changed.append(filename)


def test_shared_blocks_match_their_origin():
    problems = drift()
    assert not problems, "shared blocks drifted (run `python tests/test_shared_blocks.py --fix`):\n" + "\n".join(problems)


def test_checker_catches_drift_and_fixes_it(tmp_path):
    block = "# --- shared: demo (origin: 01_a.py) ---\nx = 1\n# --- end shared: demo ---\n"
    (tmp_path / "01_a.py").write_text("import os\n" + block)
    (tmp_path / "02_b.py").write_text(block.replace("x = 1", "x = 2") + "print(x)\n")
    problems = drift(tmp_path)
    assert len(problems) == 1 and "02_b.py:2" in problems[0]
    assert fix(tmp_path) == ["02_b.py"]
    assert drift(tmp_path) == []
    assert (tmp_path / "02_b.py").read_text().endswith("x = 1\n# --- end shared: demo ---\nprint(x)\n")


def test_fix_fills_several_blocks_of_one_file(tmp_path):
    """Filling an empty block moves every line below it; the next block must still land in place."""
    a = "# --- shared: one (origin: 01_a.py) ---\nx = 1\ny = 2\n# --- end shared: one ---\n"
    b = "# --- shared: two (origin: 01_a.py) ---\nz = 3\n# --- end shared: two ---\n"
    (tmp_path / "01_a.py").write_text(a + b)
    empty = lambda block: "\n".join(block.splitlines()[:1] + block.splitlines()[-1:]) + "\n"  # noqa: E731
    (tmp_path / "02_b.py").write_text("start = 0\n" + empty(a) + "middle = 1\n" + empty(b) + "end = 2\n")
    fix(tmp_path)
    assert (tmp_path / "02_b.py").read_text() == "start = 0\n" + a + "middle = 1\n" + b + "end = 2\n"


def test_checker_rejects_unclosed_block(tmp_path):
    (tmp_path / "01_a.py").write_text("# --- shared: demo (origin: 01_a.py) ---\nx = 1\n")
    try:
        drift(tmp_path)
    except ValueError as err:
        assert "never closed" in str(err)
    else:
        raise AssertionError("an unclosed block was accepted")


if __name__ == "__main__":
    if "--fix" in sys.argv:
        print("rewrote:", ", ".join(fix()) or "nothing")
    problems = drift()
    print("\n".join(problems) or "all shared blocks match their origin")
    sys.exit(1 if problems else 0)
