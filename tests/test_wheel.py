"""A wheel built from the repository installs into a fresh virtualenv and runs there.

The fresh environment borrows the project virtualenv's third-party packages through a ``.pth``
file (no download, no reinstall of torch) but not fedlora itself: fedlora comes only from the
wheel, so a module or file missing from the wheel fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from fedlora import __version__
from tests.conftest import REPO, TINY, read_metrics


def call(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def test_a_wheel_installs_and_runs_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building leaves build/ and egg-info behind
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    pip = (sys.executable, "-m", "pip")
    call(*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source)
    (wheel,) = dist.glob("fedlora-*.whl")
    assert wheel.name == f"fedlora-{__version__}-py3-none-any.whl"

    venv = tmp_path / "venv"
    call(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = call(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.strip()) / "project-packages.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    call(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)

    where = call(python, "-c", "import fedlora; print(fedlora.__file__)")
    assert Path(where.strip()).is_relative_to(venv)  # the wheel's fedlora, not the checkout's
    assert call(venv / "bin" / "fedlora", "--version").strip() == f"fedlora {__version__}"
    out = tmp_path / "run"
    validated = ("--set", "data.validation_fraction=0.2")  # val_* columns: a 120-column table
    fedlora = (venv / "bin" / "fedlora", "run", TINY / "fedit.toml", "--out", out, *validated)
    printed = call(*fedlora, cwd=tmp_path)
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Its output went to a pipe, not a terminal: the final table keeps every number whole
    # (rich would squeeze it to 80 columns and cut each number to "0.23…").
    assert "…" not in printed
    for record in metrics:
        for key in ("accuracy", "macro_f1", "test_loss", "val_accuracy", "val_macro_f1"):
            assert f"{record[key]:.4f}" in printed
        assert f"{record['cumulative_bytes']:,}" in printed
