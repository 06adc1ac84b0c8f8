"""The wheel as users get it: built from this checkout, installed into a fresh virtualenv.

The repository keeps ``service/`` and ``listeners/`` as folders; the wheel must install them as
``pgreact`` and ``pgreact.listeners`` and put nothing else at the top level of site-packages (a
user's own ``service`` package must never be shadowed).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("pgreact-*.whl")
    return built


def test_wheel_installs_only_the_pgreact_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"pgreact"}
    assert "pgreact/listeners/asyncpg_backend.py" in names
    assert "pgreact/schema/0001_initial.sql" in names
    assert "pgreact/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_fresh_virtualenv_imports_pgreact(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    # Dependencies come from the test venv's site-packages, appended after the fresh venv's own
    # (a .pth line: the test venv's editable finder is a .pth of its own and is *not* run).
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = """
import importlib.util, sys, pgreact, pgreact.listeners
from pgreact import Router, Event, Notification
from pgreact.listeners import backend_for
assert pgreact.__file__.startswith(sys.argv[1]), pgreact.__file__
for name in ("service", "listeners"):
    assert importlib.util.find_spec(name) is None, name
print(backend_for("memory").name)
"""
    result = subprocess.run(
        [str(python), "-I", "-c", probe, str(site)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "memory"
    cli = subprocess.run(
        [str(env / "bin" / "pgreact"), "--help"], check=False, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr
    assert "install" in cli.stdout
