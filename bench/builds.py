"""An earlier build of the platform, checked out beside this one so both can be measured in the same run."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILDS = ROOT / "var" / "bench"


def checkout(commit: str) -> Path:
    """A worktree of `commit` under var/bench/ (gitignored), added on first use and reused after."""
    sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}").strip()
    folder = BUILDS / f"build-{sha[:12]}"
    if not (folder / ".git").exists():
        BUILDS.mkdir(parents=True, exist_ok=True)
        print(f"checking out {sha[:12]} into {folder.relative_to(ROOT)} (git worktree, once)", flush=True)
        _git("worktree", "add", "--detach", str(folder), sha)
    head = _git("-C", str(folder), "rev-parse", "HEAD").strip()
    if head != sha:
        raise SystemExit(f"{folder} holds {head}, not {sha}: remove it with `git worktree remove {folder}`")
    return folder


def current() -> dict[str, object]:
    """The commit this working tree is on, and the files it changes: the build `ours` runs."""
    return {"commit": _git("rev-parse", "HEAD").strip(), "changed": _git("status", "--porcelain").splitlines()}


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout
