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

import pytest

from tests.conftest import REPO

# (floor, room) for each place of DESIGN.md; a room is a package or a module.
ROOMS: dict[str, tuple[int, str]] = {
    "megatron_ext": (0, "base"),  # the package face (__version__)
    "megatron_ext.errors": (0, "base"),
    "megatron_ext.io": (0, "io"),
    "megatron_ext.cli": (0, "cli"),
    "megatron_ext.compat": (0, "compat"),
    "megatron_ext.tokenizers": (1, "tokenizers"),
    "megatron_ext.safetensors_io": (1, "safetensors_io"),
    "megatron_ext.data": (2, "data"),
    "megatron_ext.parallel": (3, "parallel"),
    "megatron_ext.models": (4, "models"),
    "megatron_ext.peft": (5, "peft"),
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


def project_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the project's own code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target]
        else:
            continue
        for name in names:
            if name.split(".")[0] in {"megatron_ext", "tools", "instruct", "finetune"}:
                found.append((node.lineno, name))
    return found


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
