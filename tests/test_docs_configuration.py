"""Every environment variable the code reads is documented, once, in docs/configuration.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDARD = {"PATH", "PYTHONPATH", "HOME"}
READ = re.compile(r"""(?:\benv|os\.environ)\.(?:get|setdefault)\(\s*["']([A-Z][A-Z0-9_]+)["']""")


def test_every_environment_variable_is_documented_once():
    code = [p for d in ("models", "webapp", "tasks", "deploy", "tests") for p in (ROOT / d).rglob("*.py")]
    names = {name for path in code for name in READ.findall(path.read_text())} - STANDARD
    docs = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", docs, re.MULTILINE)
    assert len(names) > 10
    assert sorted(names - set(rows)) == []
    assert sorted({n for n in rows if rows.count(n) > 1}) == []
