"""The one import direction (webapp -> tasks -> models) and imports without side effects."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "models": {"webapp", "tasks", "flask", "celery", "redis", "sqlalchemy", "kombu"},
    "tasks": {"webapp", "flask"},
    "webapp": set(),
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downwards(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if package != "models" or path.name != "training.py"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_packages_loads_no_onnxruntime_and_opens_nothing():
    # onnxruntime imported before a fork breaks the children (gunicorn master, Celery prefork parent)
    code = (
        "import socket, sys\n"
        "socket.socket.connect = lambda *a: (_ for _ in ()).throw(AssertionError('connect at import'))\n"
        "import models, tasks, webapp, tasks.worker\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PATH": "/usr/bin:/bin"})


def private_uses(path: Path) -> list[str]:
    """What a module takes from its dependencies' private parts: an import from a module whose name starts with
    an underscore (`from x._y import z`), an attribute of another object whose name does (`obj._x`; this
    object's own `self._x` and `cls._x` are its business)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "__future__" and any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"from {node.module}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
                found.append(ast.unparse(node))
    return found


def _private(name: str) -> bool:
    # named tuples' `_asdict` and `_replace` are their documented public API (named so to keep clear of fields)
    return name.startswith("_") and not name.startswith("__") and name not in ("_asdict", "_replace")


def test_no_package_uses_a_dependency_s_private_api():
    offenders = {str(path.relative_to(ROOT)): private_uses(path)
                 for package in ("webapp", "tasks", "models", "deploy") for path in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
