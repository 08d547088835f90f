"""The wheel is a working product on its own: built from the sources, installed into a fresh venv, its
entry points find their packaged Hydra configs and train from a directory outside the repository.

The fresh venv reuses the heavy dependencies already installed beside the running interpreter (a .pth
line naming that environment's site-packages), but not its editable ``recsys``: a plain path line in a
.pth file only extends ``sys.path``, so the ``.pth`` files of the editable install there are never run,
and the fresh venv's own site-packages (holding the wheel) comes first on ``sys.path`` anyway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("recsys-train", "recsys-score", "recsys-data", "recsys-quant", "recsys-evaluate", "recsys-compare",
           "recsys-dist")
ALIASES = {"recsys-dist": "train"}  # distributed runs are recsys.train under torchrun


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs ``cmd`` with no PYTHONPATH (the tests' own points at a checkout), one thread, output captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RECSYS_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources, so the build leaves no build/ or egg-info in the repo."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("recsys", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("recsys-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv holding only the wheel, with this environment's site-packages appended to its path."""
    root = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    fresh_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           cwd=tmp).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this env's, in order
    (fresh_site / "recsys_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=tmp)
    return root


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_repo(tmp_path):
    wheel = _build_wheel(tmp_path)
    root = _fresh_venv(tmp_path, wheel)
    python, work = root / "bin" / "python", tmp_path / "elsewhere"
    work.mkdir()

    # The imported recsys is the wheel's, its configs are packaged, every console script is declared.
    probe = _run([str(python), "-c", (
        "import json, recsys, importlib.metadata as md; from recsys.configs import CONFIG_DIR\n"
        "eps = {e.name: e.value for e in md.distribution('recsys').entry_points if e.group == 'console_scripts'}\n"
        "print(json.dumps({'file': recsys.__file__, 'configs': sorted(str(p.relative_to(CONFIG_DIR))\n"
        "    for p in CONFIG_DIR.rglob('*.yaml')), 'scripts': eps}))")], cwd=work)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    package = Path(found["file"]).resolve().parent
    assert package.is_relative_to(root.resolve()), found["file"]
    assert found["configs"] == sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert sorted(found["scripts"]) == sorted(SCRIPTS)
    # The native CPU attention kernels' source ships too (compiled from it on first use).
    assert (package.parent / "kernels" / "cpu" / "small_head_attention.cpp").is_file()
    for script, target in found["scripts"].items():
        stage = ALIASES.get(script, script.removeprefix("recsys-"))
        assert target == f"recsys.{stage}.__main__:main", (script, target)
        assert (package / stage / "__main__.py").is_file() and (root / "bin" / script).is_file(), script

    # `python -m` from another directory: Hydra finds the config tree beside the installed __main__.py.
    out = tmp_path / "run"
    proc = _run([str(python), "-m", "recsys.train", "model=debug", "data=tiny", "train.max_steps=2",
                 "train.progress=false", f"data.root={tmp_path / 'data'}", f"output_dir={out}"], cwd=work)
    report = Path(proc.stdout.strip().splitlines()[-1])
    assert report == out / "report.json" and json.loads(report.read_text())["steps"] == 2

    # A console script: Hydra resolves the same tree as pkg://recsys/configs (module mode).
    helped = _run([str(root / "bin" / "recsys-train"), "--help"], cwd=work).stdout
    assert "model: " in helped and "debug" in helped and "tiny" in helped, helped[-2000:]
