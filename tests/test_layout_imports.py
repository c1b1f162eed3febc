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
