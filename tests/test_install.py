"""``pip install -e .`` as users type it (issue 16, part 6).

pip's default build isolation runs setup.py in a temporary environment that holds only
pyproject.toml's build requirements, so the installed torch is hidden from it. setup.py then
finds that torch in the target environment's own site-packages (``_import_torch``) instead of
stopping with ``ModuleNotFoundError: No module named 'torch'``; with no torch anywhere it stops
with one line saying what to install.

* The fast tests hide torch exactly as pip does (a sitecustomize on PYTHONPATH drops the
  environment's site-packages from sys.path; the build requirements come from an overlay) and
  run setup.py in a subprocess.
* The slow test runs pip itself, with isolation, as ``pip install --dry-run -e <copy>``: pip
  builds the isolated environment and prepares the metadata by running setup.py (the step that
  failed), but compiles and installs nothing. It skips when pip cannot get the build
  requirements (setuptools, wheel, ninja) from an index.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# pip's BuildEnvironment does this (pip/_internal/build_env.py): the interpreter's own
# site-packages leave sys.path; the build requirements come from an overlay on PYTHONPATH.
HIDE_SITE = textwrap.dedent(r"""
    import os, site, sys, sysconfig
    hidden = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
              site.getusersitepackages(), *site.getsitepackages()}
    hidden = {os.path.realpath(p) for p in hidden}
    sys.path[:] = [p for p in sys.path if os.path.realpath(p) not in hidden]
""")
BLOCK_TORCH = textwrap.dedent(r"""
    import importlib.abc
    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("test_install: no torch in this environment")
    sys.meta_path.insert(0, _NoTorch())
""")


def _isolated_env(tmp_path: Path, block_torch: bool = False) -> dict:
    """Environment variables for a Python that sees the world as pip's isolated build does."""
    import setuptools

    custom = tmp_path / "custom"
    custom.mkdir(exist_ok=True)
    (custom / "sitecustomize.py").write_text(HIDE_SITE + (BLOCK_TORCH if block_torch else ""))
    overlay = tmp_path / "overlay"  # the build requirements: setuptools, as pip installs it
    overlay.mkdir(exist_ok=True)
    site_dir = Path(setuptools.__file__).resolve().parents[1]
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if (site_dir / name).exists() and not (overlay / name).exists():
            (overlay / name).symlink_to(site_dir / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QGAIT_NO_EXT")}
    env.update(PYTHONPATH=f"{custom}{os.pathsep}{overlay}", PYTHONNOUSERSITE="1",
               SETUPTOOLS_USE_DISTUTILS="local")
    return env


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def test_setup_py_finds_the_installed_torch_when_pip_hides_it(tmp_path):
    import torch

    env = _isolated_env(tmp_path)
    # the emulation hides torch as pip does: a plain import fails ...
    p = _run([sys.executable, "-c", "import torch"], cwd=tmp_path, env=env)
    assert p.returncode != 0 and "No module named 'torch'" in p.stderr, p.stderr[-2000:]
    # ... setuptools (the build requirement) still imports
    p = _run([sys.executable, "-c", "import setuptools"], cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    # setup.py finds the environment's torch, the very one installed here, and gets as far as
    # its metadata (what pip asks first)
    script = ("import runpy, sys; sys.argv = ['setup.py', '--name']; "
              "runpy.run_path('setup.py', run_name='__main__'); "
              "print('TORCH', sys.modules['torch'].__file__)")
    p = _run([sys.executable, "-c", script], cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert "qgait" in lines and lines[-1] == f"TORCH {torch.__file__}", lines


def test_setup_py_without_any_torch_says_what_to_do_in_one_line(tmp_path):
    p = _run([sys.executable, "setup.py", "--name"], cwd=ROOT,
             env=_isolated_env(tmp_path, block_torch=True))
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert err[0].startswith("qgait: building qgait._C needs torch") and \
        "pip install torch==2.13.0" in err[0] and "QGAIT_NO_EXT=1" in err[0]
    # QGAIT_NO_EXT=1 needs no torch at all
    env = _isolated_env(tmp_path, block_torch=True) | {"QGAIT_NO_EXT": "1"}
    p = _run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "qgait", p.stderr[-2000:]


@pytest.mark.slow
def test_plain_pip_install_editable_with_build_isolation(tmp_path):
    """pip itself, with its default build isolation, prepares the editable install."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".benchmarks",
        ".pytest_cache", "runs", "outputs", ".hypothesis"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QGAIT_NO_EXT")}
    p = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
              "--ignore-installed", "--no-cache-dir", "-e", str(src)], env=env)
    out = p.stdout + p.stderr
    if p.returncode != 0 and any(s in out for s in (
            "No matching distribution found", "Could not find a version",
            "Failed to establish a new connection", "Temporary failure in name resolution")):
        pytest.skip("pip cannot get the build requirements (setuptools, wheel, ninja) here")
    assert p.returncode == 0, out[-4000:]
    assert "No module named 'torch'" not in out
    assert "Would install qgait-0.1.0" in out, out[-2000:]
