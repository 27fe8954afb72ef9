"""The house plan's floor order, checked from the imports of every module.

Why: ../shared/DESIGN.md stacks the rooms of ``megatron_ext`` on floors, and
a room may only import its own room or a lower floor. A plan that only lives
in a document drifts; this test reads every ``import`` (top-level, inside
functions and under ``TYPE_CHECKING`` alike) and fails on an upward or
sideways import, or on a module that the plan does not place.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import REPO

# (floor, room) for each place of DESIGN.md; a room is a package or a module.
ROOMS: dict[str, tuple[int, str]] = {
    "megatron_ext": (0, "base"),  # the package face (__version__)
    "megatron_ext.errors": (0, "base"),
    "megatron_ext.io": (0, "io"),
    "megatron_ext.cli": (0, "cli"),
    "megatron_ext.compat": (0, "compat"),
    "megatron_ext.startup": (0, "startup"),
    "megatron_ext.tokenizers": (1, "tokenizers"),
    "megatron_ext.safetensors_io": (1, "safetensors_io"),
    "megatron_ext.data": (2, "data"),
    "megatron_ext.parallel": (3, "parallel"),
    "megatron_ext.models": (4, "models"),
    "megatron_ext.peft": (5, "peft"),
    "megatron_ext.hf_native": (5, "hf_native"),
    "megatron_ext.checkpointing": (6, "checkpointing"),
    "megatron_ext.training": (7, "training"),
    "megatron_ext.inference": (7, "inference"),
    "megatron_ext.launch": (8, "launch"),
    "tools": (9, "tools"),
    "instruct": (9, "instruct"),
    "finetune": (9, "finetune"),
}
# Floor 0 rooms know nothing of the project but the error type; compat not even that.
BASE_IMPORTABLE_BY = {"io", "cli"}


def room_of(module: str) -> tuple[int, str]:
    """The (floor, room) of a dotted module name: its longest planned prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in ROOMS and (name != "megatron_ext" or end == len(parts)):  # face: exact only
            return ROOMS[name]
    raise KeyError(module)


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only(tree: ast.AST) -> set[int]:
    """The ids of the import statements under ``if TYPE_CHECKING:`` (never executed)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return found


def _imports(path: Path, module: str) -> Iterator[tuple[int, str, list[str], bool]]:
    """(line, module, names, type_only) of every import statement: ``import a.b`` gives
    ("a.b", []), ``from a import b, c`` gives ("a", ["b", "c"]) with relative imports
    resolved; type_only: under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], id(node) in type_only
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, [alias.name for alias in node.names], id(node) in type_only


def project_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the project's own code."""
    return [(line, target) for line, target, _, _ in _imports(path, module)
            if target.split(".")[0] in {"megatron_ext", "tools", "instruct", "finetune"}]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def sources() -> list[Path]:
    files = sorted((REPO / "megatron_ext").rglob("*.py"))
    files += sorted((REPO / "tools").glob("*.py")) + sorted((REPO / "instruct").glob("*.py"))
    return files + [REPO / "finetune.py"]


def violations(files: list[tuple[Path, str]] | None = None) -> list[str]:
    """Every import against the plan, for (path, module name) pairs (default: the tree)."""
    problems = []
    for path, module in files if files is not None else [(p, module_name(p)) for p in sources()]:
        try:
            floor, room = room_of(module)
        except KeyError:
            problems.append(f"{shown(path)}: module {module} has no place in the "
                            "plan (add its room to DESIGN.md and to ROOMS here)")
            continue
        for line, target in project_imports(path, module):
            where = f"{shown(path)}:{line}: {module} imports {target}"
            try:
                target_floor, target_room = room_of(target)
            except KeyError:
                problems.append(f"{where}, which has no place in the plan")
                continue
            if target_room == room:
                if room in {"tools", "instruct"} and target != module:
                    problems.append(f"{where}: a CLI never imports another CLI; move the "
                                    "shared part into the library")
                continue
            if floor == 0 and target_room == "base" and room in BASE_IMPORTABLE_BY:
                continue
            if room == "compat":
                problems.append(f"{where}: the CPU compat layer knows nothing of the project")
            elif floor == 0:
                problems.append(f"{where}: floor 0 imports only megatron_ext.errors")
            elif target_floor > floor:
                problems.append(f"{where}: upward import (floor {floor} → {target_floor})")
            elif target_floor == floor:
                problems.append(f"{where}: sideways import between rooms of floor {floor}")
    return problems


def test_every_import_follows_the_floor_order():
    problems = violations()
    assert not problems, "the code and DESIGN.md's floors disagree:\n" + "\n".join(problems)


@pytest.mark.parametrize("module, source, expected", [
    ("megatron_ext.models.probe", "from megatron_ext.training.trainer import Trainer\n",
     "upward import"),
    ("megatron_ext.training.probe", "from megatron_ext.inference import generation\n",
     "sideways import"),
    ("megatron_ext.models.probe", "import megatron_ext.nowhere\n", "no place in the plan"),
    ("megatron_ext.models.probe", "def f():\n    from megatron_ext.checkpointing import x\n",
     "upward import"),
    ("megatron_ext.data.probe", "from ..parallel import Layout\n", "upward import"),
    ("megatron_ext.io", "from megatron_ext.data import records\n", "floor 0"),
    ("tools.probe", "from tools.generate import main\n", "never imports another CLI"),
    ("megatron_ext.nowhere", "", "no place in the plan"),
])
def test_the_checker_catches_bad_imports(tmp_path, module, source, expected):
    """Each kind of violation is caught (else the test above would prove nothing)."""
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    problems = violations([(probe, module)])
    assert any(expected in problem for problem in problems), problems


def test_the_checker_accepts_allowed_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from megatron_ext.errors import UserError\n"
                     "from megatron_ext.models.builder import build\n"
                     "from megatron_ext.data import records\nfrom . import sibling\n",
                     encoding="utf-8")
    assert violations([(probe, "megatron_ext.checkpointing.probe")]) == []


# -- no import cycles ---------------------------------------------------------------------------
#
# Why: DESIGN.md's convention "no import cycles between modules, function-level imports
# included". A cycle inside one room passes the floor order above, and an import moved into
# a function only hides it; here every import that runs counts (top level or in a function),
# between the modules themselves: ``from pkg import mod`` is an import of ``pkg.mod``, and
# importing ``pkg.mod`` is not counted as importing ``pkg``'s face. An import under ``if
# TYPE_CHECKING:`` never runs: it names types for the checker (two classes of a room that
# mention each other), which is what it is for; the floor order above still checks it.


def import_graph(files: list[tuple[Path, str]] | None = None) -> dict[str, set[str]]:
    """Each module -> the modules of ``files`` it imports (default: the library and CLIs)."""
    files = files if files is not None else [(p, module_name(p)) for p in sources()]
    known = {module for _, module in files}
    graph: dict[str, set[str]] = {module: set() for module in known}
    for path, module in files:
        for _, target, names, type_only in _imports(path, module):
            for name in [] if type_only else names or [""]:
                imported = f"{target}.{name}" if f"{target}.{name}" in known else target
                if imported in known and imported != module:
                    graph[module].add(imported)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, each importing the next, the last the first) for
    each group of modules that import each other, found by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while not group or member != module:
                member = stack.pop()
                group.add(member)
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_shortest_cycle(graph, group) for group in groups]


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for target in sorted(graph[module] & group):
            if target == start:
                return paths[module]
            if target not in paths:
                paths[target] = paths[module] + [target]
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group has one


def test_no_module_imports_itself_through_others():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (function-level imports count too):\n" + "\n".join(
        " -> ".join(c + [c[0]]) for c in cycles)


def test_the_cycle_checker_names_each_cycle(tmp_path):
    """A cycle through a function-level import is found and named; a chain is not one, nor
    a type hint's import."""
    sources = {"megatron_ext.launch.a": "from megatron_ext.launch import b\n",
               "megatron_ext.launch.b": "def f():\n    from megatron_ext.launch.c import x\n",
               "megatron_ext.launch.c": "from . import a\nimport megatron_ext.launch.d\n",
               "megatron_ext.launch.d": "from typing import TYPE_CHECKING\n"
                                        "if TYPE_CHECKING:\n    from . import a\n"}
    files = []
    for module, source in sources.items():
        path = tmp_path / f"{module.rpartition('.')[2]}.py"
        path.write_text(source, encoding="utf-8")
        files.append((path, module))
    assert import_cycles(import_graph(files)) == [
        ["megatron_ext.launch.a", "megatron_ext.launch.b", "megatron_ext.launch.c"]]
    assert import_cycles(import_graph(files[1:])) == []
