"""Every feature pays for itself in code: `src/` and the lab (the files a student reads to understand
and train a PixelCNN) have budgets of code lines, and no line of `src/` is over 120 characters.

A code line holds a token that is not a comment, outside docstrings; blank lines, comments and
docstrings are free, so the budget is met by removing code, never by deleting the comments that say why."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

from test_layout import SRC, import_graph

# Issue 27 asks for 3,000; the restructure of 2026-12-07 left src/ at 3,647 with every guarantee kept, and a later
# pass of five reviewers over every ops file at 3,603 (3,606 with the checked resume of a finished run and the
# check of added keys; 3,605 with the check of keys forced with ++, +11, paid for by 12 lines cut elsewhere;
# 3,585 after three more reviewers' cuts; 3,532 after two more passes of seven reviewers, with two more checks of
# the command line and the free-memory fallback paid for; 3,521 after three more reviewers' cuts (34 lines), which paid
# for the refusal of Trainer arguments the run sets itself, outputs that never replace another's files and integer
# keys that take no float; 3,520 with sweeps that keep their jobs' records; 3,517 with remove_own_dir's dead sweep
# case gone; 3,516 after the review: the precision check through _one_of). Raised once, to 3,546, by the trust fixes of
# 2026-12-07 evening (files read as data, checkpoints checked as read, databases of other programs or schemas, Lightning's
# refusals, true precisions, output_subdir): +67 lines, of which six reviewers' cuts paid 37; the rest would have
# meant dropping a feature.
# The budget is where the code is: a feature pays for itself by removing code elsewhere.
# Lower it as code goes; never raise it for a feature.
SRC_BUDGET = 3_546
LAB_BUDGET = 1_000
MAX_LINE = 120
# The lab: networks, sampler, likelihood, the LightningModule, the data module's core and train().
LAB = ("pixelcnn_net", "gated_net", "sampling", "likelihood", "module", "data", "training")
SEAM = "pixelcnn.ops"  # the one name the lab imports the ops wing by (ops/__init__.py lists what it offers)


def code_lines(text: str) -> int:
    """Lines that hold a token other than a comment, outside docstrings."""
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return len(lines - docstrings)


def counts(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): code_lines(path.read_text()) for path in sorted(root.rglob("*.py"))}


def lab_paths(root: Path) -> list[str]:
    return [f"pixelcnn/{name}.py" for name in LAB if (root / "pixelcnn" / f"{name}.py").is_file()]


def test_src_is_within_its_code_line_budget():
    per_file = counts(SRC)
    total = sum(per_file.values())
    biggest = ", ".join(f"{name} {n}" for name, n in sorted(per_file.items(), key=lambda kv: -kv[1])[:5])
    assert total <= SRC_BUDGET, f"src/ has {total} code lines, over its budget of {SRC_BUDGET} (largest: {biggest})"


def test_the_lab_is_within_its_code_line_budget():
    per_file = counts(SRC)
    lab = {name: per_file[name] for name in lab_paths(SRC)}
    assert len(lab) == len(LAB), f"lab files missing: {set(LAB) - {Path(p).stem for p in lab}}"
    assert sum(lab.values()) <= LAB_BUDGET, f"the lab has {sum(lab.values())} code lines, over {LAB_BUDGET}: {lab}"


def test_no_line_of_src_is_too_long():
    long = [f"{path.relative_to(SRC)}:{i}" for path in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"lines over {MAX_LINE} characters: {', '.join(long)}"


def test_the_lab_reaches_the_ops_wing_only_through_its_seam():
    graph = import_graph(SRC)
    crossings = [f"{module}:{line} imports {target}" for module, imports in graph.items()
                 if module.removeprefix("pixelcnn.") in LAB
                 for target, line in imports if target.startswith((SEAM + ".", "pixelcnn.commands"))]
    assert not crossings, "\n".join(crossings)


# The counter itself, on small texts: each kind of line counts or not as said.


@pytest.mark.parametrize("text, expected", [
    ("x = 1\n", 1),
    ("# a comment\n\nx = 1  # why\n", 1),
    ('"""Module doc\nover two lines."""\nx = 1\n', 1),
    ('def f():\n    """Doc."""\n    return 1\n', 2),
    ('x = """not a docstring\nbut a value"""\n', 2),
    ("y = f(\n    1,\n    2,\n)\n", 4),
    ("class C:\n    '''doc'''\n\n    a: int\n", 2),
])
def test_code_lines_counts_code_only(text: str, expected: int):
    assert code_lines(text) == expected


def test_a_lab_file_importing_an_ops_module_is_found(tmp_path):
    from test_layout import write_package
    root = write_package(tmp_path, {"pixelcnn/__init__.py": "", "pixelcnn/ops/__init__.py": "",
                                    "pixelcnn/ops/run_dirs.py": "", "pixelcnn/data.py": "from pixelcnn.ops import run_dirs\n",
                                    "pixelcnn/training.py": "from pixelcnn import ops\n"})
    graph = import_graph(root)
    assert ("pixelcnn.ops.run_dirs", 1) in graph["pixelcnn.data"]
    assert graph["pixelcnn.training"] == [("pixelcnn.ops", 1)]


def test_the_seam_counts_as_importing_its_modules(tmp_path):
    from test_layout import find_cycle, write_package
    root = write_package(tmp_path, {"pixelcnn/__init__.py": "", "pixelcnn/ops/__init__.py": 'SEAM = {"run_dirs": ("f",)}\n',
                                    "pixelcnn/ops/run_dirs.py": "from pixelcnn import data\n",
                                    "pixelcnn/data.py": "from pixelcnn.ops import f\n"})
    graph = import_graph(root)
    assert ("pixelcnn.ops.run_dirs", 1) in graph["pixelcnn.ops"]
    assert find_cycle(graph) == ["pixelcnn.data", "pixelcnn.ops", "pixelcnn.ops.run_dirs", "pixelcnn.data"]
