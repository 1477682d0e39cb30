"""The package as a user installs it: a wheel built from the sources, installed into a fresh virtual
environment outside the checkout, runs ``megatron-tgdpo --help`` and the demo's first stages from a
directory that is not the checkout.

The fresh environment gets the wheel with ``--no-deps`` and sees the running interpreter's
site-packages (torch, megatron-core, ...) through a ``.pth`` line, so nothing is downloaded and the
check is about the package itself: its console script, its package data (the built-in tokenizer and
data set), and no path into ``examples/`` or ``tools/`` of a checkout. ``PYTHONPATH`` is cleared, and
the test asserts that the imported ``megatron_tgdpo`` is the installed one.

The demo runs with ``--preset smoke --methods sft``: prompts -> SFT data -> SFT training (a child
process) -> sampling (a child process) -> scoring -> pairs -> held-out evaluation -> the table; the
preference models are the same code paths as in tests/e2e/test_replicate.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _copy_sources(dest: Path) -> Path:
    """What a source distribution holds: setup.py, MANIFEST.in, README.md and the package (no tests,
    tools or examples), so the wheel cannot lean on the rest of the checkout."""
    dest.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "megatron_tgdpo", dest / "megatron_tgdpo",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return env


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv, a working directory outside the checkout)."""
    base = tmp_path_factory.mktemp("wheel_install")
    assert ROOT not in base.parents
    src = _copy_sources(base / "src")
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=base, env=dict(os.environ))
    (wheel,) = dist.glob("megatron_tgdpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("train.jsonl", "eval.jsonl", "tokenizer.model"):
        assert f"megatron_tgdpo/resources/synthetic/{shipped}" in names, f"{shipped} is not in the wheel"
    assert not [n for n in names if n.startswith(("tests/", "tools/", "examples/"))]

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=dict(os.environ))
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=_env(venv)).stdout.strip()
    # Installed before the venv can see the running environment: pip then finds no megatron_tgdpo there
    # (an installed or editable one of the checkout would count as "already satisfied").
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=base, env=_env(venv))
    # The dependencies come from the running interpreter's environment (a plain path line: its own .pth
    # files, e.g. an editable install of the checkout, are not processed).
    parent = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + [
        p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()])
    # None of them holds the package itself (a virtual environment inside the checkout may: CI's does).
    assert not [p for p in parent if (Path(p) / "megatron_tgdpo").exists()]
    Path(purelib, "zz_running_environment.pth").write_text("".join(f"{p}\n" for p in parent))
    work = base / "work"
    work.mkdir()
    return venv, work


def test_installed_package_is_the_one_imported(installed):
    venv, work = installed
    code = ("import megatron_tgdpo; from megatron_tgdpo.data.builtin import SYNTHETIC_DIR; "
            "print(megatron_tgdpo.__file__); print(SYNTHETIC_DIR)")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=work, env=_env(venv)).stdout.split()
    package, data = Path(out[0]).resolve(), Path(out[1]).resolve()
    assert venv.resolve() in package.parents and ROOT not in package.parents, package
    assert venv.resolve() in data.parents and (data / "tokenizer.model").is_file(), data


def test_help_lists_every_command(installed):
    from megatron_tgdpo.cli.commands import COMMANDS

    venv, work = installed
    script = venv / "bin" / "megatron-tgdpo"
    assert script.is_file(), "the console script was not installed"
    text = _run([str(script), "--help"], cwd=work, env=_env(venv)).stdout
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()]
    assert [c.name for c in COMMANDS] == [name for name in listed if name in {c.name for c in COMMANDS}]
    assert len(COMMANDS) >= 12
    sub = _run([str(script), "pairs", "--help"], cwd=work, env=_env(venv)).stdout
    assert sub.startswith("usage: megatron-tgdpo pairs")


def test_demo_first_stages_run_from_the_wheel(installed):
    venv, work = installed
    result = _run([str(venv / "bin" / "megatron-tgdpo"), "demo", "--preset", "smoke", "--methods", "sft",
                   "--eval-samples", "0", "--workdir", "demo"], cwd=work, env=_env(venv))
    out = result.stdout
    for stage in ("data.prompts", "data.sft", "seed1.sft", "seed1.samples", "seed1.pairs", "seed1.eval.sft"):
        assert f"[done] {stage}" in out, out[-3000:]
    table = out[out.index("model "):].splitlines()
    assert table[2].split()[0] == "SFT", "\n".join(table)
    assert (work / "demo" / "seed1" / "pairs.manifest.json").is_file()
    # The training child ran the installed package with the venv's interpreter.
    log = (work / "demo" / "logs" / "seed1.sft.log").read_text()
    assert log.startswith(f"$ {venv / 'bin' / 'python'}"), log[:300]
