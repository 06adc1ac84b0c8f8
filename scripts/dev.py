#!/usr/bin/env python3
"""The project's two entry points, runnable with nothing but Python 3.11+:

    python3 scripts/dev.py demo   # venv + install + `pgreact demo` on an embedded PostgreSQL
    python3 scripts/dev.py test   # venv + install + test tools + ruff + mypy + pytest
    python3 scripts/dev.py lock   # rewrite constraints.txt from what .venv has installed

Both create ``.venv`` beside the project on first use and reinstall only when ``pyproject.toml``
or ``constraints.txt`` changed; every dependency is installed at the version constraints.txt
pins (the Dockerfile installs with it too). Extra arguments after ``test`` go to pytest; after
``demo``, to ``pgreact demo``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PGREACT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
CONSTRAINTS = ROOT / "constraints.txt"


def sh(*args: str | Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    result = subprocess.run([str(a) for a in args], cwd=ROOT, env=env, check=False)  # noqa: S603
    if result.returncode != 0:
        sys.exit(result.returncode)


TEST_EXTRAS = "test,demo,speed,bench"


def ensure_venv(extras: str) -> None:
    if not PY.exists():  # Python 3.11+ is required (pyproject says so; pip enforces it)
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".pgreact-installed-{extras.replace(',', '-')}"
    inputs = [ROOT / "pyproject.toml", CONSTRAINTS]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs if p.exists())).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    sh(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    pins = ["--constraint", CONSTRAINTS] if CONSTRAINTS.exists() else []
    sh(PY, "-m", "pip", "install", "--quiet", *pins, "-e", f"{ROOT}[{extras}]")
    stamp.write_text(digest)


LOCK_HEADER = """\
# Pinned versions of every package the development virtualenv installs (all extras: test, demo,
# speed, bench), pgreact itself excluded. scripts/dev.py and the Dockerfile install with
# `pip install --constraint constraints.txt ...`, so CI, the image and your .venv agree.
# Regenerate after changing dependencies in pyproject.toml: python3 scripts/dev.py lock
"""


def lock(args: list[str] | None = None) -> None:
    """constraints.txt from what the virtualenv has: upgrade it first to move the pins."""
    ensure_venv(TEST_EXTRAS)
    frozen = subprocess.run(  # noqa: S603
        [str(PY), "-m", "pip", "freeze", "--exclude-editable", "--exclude", "pgreact"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins = sorted(frozen.splitlines(), key=str.lower)
    CONSTRAINTS.write_text(LOCK_HEADER + "\n".join(pins) + "\n")
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)} ({len(pins)} pins)", flush=True)


def demo(args: list[str]) -> None:
    ensure_venv("demo,speed")
    sh(BIN / "pgreact", "demo", *args)


def typecheck_tree() -> None:
    """Lay ``build/typecheck/pgreact`` out as the wheel does (``service/`` as ``pgreact``,
    ``listeners/`` as ``pgreact.listeners``) out of symlinks: mypy follows no package-dir
    mapping and no editable-install finder, but it does follow links. Links are added and
    pruned in place, so two runs at once never see a half-built tree."""
    tree = ROOT / "build" / "typecheck" / "pgreact"
    tree.mkdir(parents=True, exist_ok=True)
    wanted = {e.name: e for e in (ROOT / "service").iterdir() if e.name != "__pycache__"}
    wanted["listeners"] = ROOT / "listeners"
    for link in tree.iterdir():
        if link.name not in wanted:
            link.unlink()
    for name, target in wanted.items():
        link = tree / name
        if not link.is_symlink():
            with contextlib.suppress(FileExistsError):  # another run laid it just now
                link.symlink_to(target)


def lint(args: list[str] | None = None) -> None:
    ensure_venv(TEST_EXTRAS)
    sh(BIN / "ruff", "check", "service", "listeners", "tests", "benchmarks", "scripts")
    sh(BIN / "ruff", "format", "--check", "service", "listeners", "tests", "benchmarks", "scripts")
    typecheck_tree()
    sh(BIN / "mypy")


def test(args: list[str]) -> None:
    tools = ROOT / "scripts" / "install-test-tools.sh"
    if tools.exists():
        sh("bash", tools)
    lint()
    sh(PY, "-m", "pytest", *args)


def main() -> None:
    commands = {"demo": demo, "test": test, "lint": lint, "lock": lock}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} {{demo|test|lint|lock}} [args…]")
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
