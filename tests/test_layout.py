"""The package layout, checked statically (ast only, nothing imported): the library never imports a
command, pixelcnn's imports have no cycle, and each root entry point is a thin wrapper around its
own module in pixelcnn/commands/. Every import that can run counts, late ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
COMMANDS = "pixelcnn.commands"
ENTRY_POINTS = ("train", "sample", "evaluate", "bench", "train_classifier")

Graph = dict[str, list[tuple[str, int]]]  # module -> [(imported pixelcnn module, line)]


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(src: Path, name: str) -> bool:
    path = src.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def runtime_imports(tree: ast.AST):
    """Import statements at any depth, except under `if TYPE_CHECKING:` (they never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def pixelcnn_imports(path: Path, src: Path) -> list[tuple[str, int]]:
    """(module, line) for each pixelcnn module that `path` imports; relative imports resolved."""
    found = set()
    for node in runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: `.` is the importer's package, each further dot its parent
                package = module_name(path, src).split(".")[: None if path.name == "__init__.py" else -1]
                package = ".".join(package[: len(package) - node.level + 1])
                base = f"{package}.{base}" if base else package
            # `from pkg import x` imports the submodule pkg.x if there is one, else a name defined by pkg.
            targets = [f"{base}.{a.name}" if is_module(src, f"{base}.{a.name}") else base for a in node.names]
        found |= {(t, node.lineno) for t in targets if t == "pixelcnn" or t.startswith("pixelcnn.")}
    return sorted(found | seam_imports(path, src), key=lambda imp: (imp[1], imp[0]))


def seam_imports(path: Path, src: Path) -> set[tuple[str, int]]:
    """A package's lazy `SEAM = {module: names}` (pixelcnn/ops/__init__.py) imports each module on first use:
    those imports count too, so that no cycle hides behind the seam."""
    if path.name != "__init__.py":
        return set()
    package = module_name(path, src)
    return {(f"{package}.{module.value}", node.lineno) for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["SEAM"]
            and isinstance(node.value, ast.Dict) for module in node.value.keys if isinstance(module, ast.Constant)}


def import_graph(src: Path) -> Graph:
    graph = {}
    for path in sorted((src / "pixelcnn").rglob("*.py")):
        name = module_name(path, src)
        graph[name] = [(t, line) for t, line in pixelcnn_imports(path, src) if t != name]
    return graph


def is_command(module: str) -> bool:
    return module == COMMANDS or module.startswith(COMMANDS + ".")


def library_imports_of_commands(graph: Graph) -> list[str]:
    return [
        f"{module}:{line} imports {target}"
        for module, imports in graph.items()
        if not is_command(module)
        for target, line in imports
        if is_command(target)
    ]


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for target, _ in graph.get(module, ()):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def skip_before_commands_exist():
    if not (SRC / "pixelcnn" / "commands").is_dir():
        pytest.skip("src/pixelcnn/commands/ does not exist yet")


# The layout of this repository.


def test_the_library_never_imports_a_command():
    problems = library_imports_of_commands(import_graph(SRC))
    assert not problems, "\n".join(problems)


def test_imports_have_no_cycle():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_entry_points_only_wrap_their_command():
    skip_before_commands_exist()
    problems = []
    for name in ENTRY_POINTS:
        imports = pixelcnn_imports(ROOT / f"{name}.py", SRC)
        problems += [f"{name}.py:{line} imports {t}, not a command" for t, line in imports if not is_command(t)]
        if f"{COMMANDS}.{name}" not in {t for t, _ in imports}:
            problems.append(f"{name}.py never imports {COMMANDS}.{name}")
    assert not problems, "\n".join(problems)


def test_each_command_belongs_to_a_root_entry_point():
    skip_before_commands_exist()
    commands = {m.rpartition(".")[2] for m in import_graph(SRC) if m.startswith(COMMANDS + ".")} - {"cli"}
    assert commands == set(ENTRY_POINTS), (
        f"commands without a root entry point: {sorted(commands - set(ENTRY_POINTS))}, "
        f"root entry points without a command: {sorted(set(ENTRY_POINTS) - commands)}"
    )


# The checks above, on small fake packages: each can fail, and each import form counts.


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


CLEAN = {
    "pixelcnn/__init__.py": "from . import model\n",
    "pixelcnn/model.py": "import torch\n",
    "pixelcnn/training.py": "from pixelcnn.model import Net\n\ndef train():\n    from .model import Net\n",
    "pixelcnn/commands/__init__.py": "",
    "pixelcnn/commands/cli.py": "from pixelcnn import training\n",
    "pixelcnn/commands/train.py": "from . import cli\nfrom ..training import train\n",
}


@pytest.mark.parametrize(
    "statement, target",
    [
        ("import pixelcnn.model", "pixelcnn.model"),
        ("import pixelcnn.model as m", "pixelcnn.model"),
        ("from pixelcnn.model import Net", "pixelcnn.model"),
        ("from pixelcnn import model", "pixelcnn.model"),
        ("from pixelcnn import VERSION", "pixelcnn"),
        ("from pixelcnn.commands import cli", "pixelcnn.commands.cli"),
        ("from . import cli", "pixelcnn.commands.cli"),
        ("from .cli import main", "pixelcnn.commands.cli"),
        ("from .. import model", "pixelcnn.model"),
        ("from ..model import Net", "pixelcnn.model"),
        ("def f():\n    import pixelcnn.model", "pixelcnn.model"),
        ("class C:\n    def m(self):\n        from pixelcnn import model", "pixelcnn.model"),
        ("if TYPE_CHECKING:\n    import pixelcnn.model", None),
        ("if typing.TYPE_CHECKING:\n    pass\nelse:\n    import pixelcnn.model", "pixelcnn.model"),
        ("import os.path", None),
    ],
)
def test_every_import_form_counts(tmp_path, statement, target):
    src = write_package(tmp_path, CLEAN | {"pixelcnn/commands/x.py": "\n" + statement + "\n"})
    assert import_graph(src)["pixelcnn.commands.x"] == ([(target, statement.count("\n") + 2)] if target else [])


def test_a_clean_package_passes(tmp_path):
    graph = import_graph(write_package(tmp_path, CLEAN))
    assert library_imports_of_commands(graph) == []
    assert find_cycle(graph) is None


@pytest.mark.parametrize(
    "files, cycle",
    [
        ({"pixelcnn/model.py": "def f():\n    from . import training\n"}, "pixelcnn.model pixelcnn.training"),
        ({"pixelcnn/model.py": "import pixelcnn\n"}, "pixelcnn pixelcnn.model"),  # through __init__
    ],
)
def test_a_cycle_is_found(tmp_path, files, cycle):
    found = find_cycle(import_graph(write_package(tmp_path, CLEAN | files)))
    assert found == cycle.split() + cycle.split()[:1]


def test_a_library_import_of_a_command_is_found(tmp_path):
    files = {"pixelcnn/model.py": "import torch\n\ndef f():\n    from pixelcnn.commands import train\n"}
    graph = import_graph(write_package(tmp_path, CLEAN | files))
    assert library_imports_of_commands(graph) == ["pixelcnn.model:4 imports pixelcnn.commands.train"]
