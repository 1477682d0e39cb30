"""``megatron-tgdpo <command>``: the help lists every command of the table, dispatch imports only the
chosen command, each command's help names it, unknown commands are one line and exit 2, and the
earlier entry points (``tools/*.py``, ``python -m megatron_tgdpo.<module>``) run the same code."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tgdpo.cli import commands, dispatch

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_tgdpo"
# Commands whose implementation another module provides, imported by name when the command runs.
BY_NAME = {"generate": "megatron_tgdpo.generation.cli", "precompute": "megatron_tgdpo.precompute"}


def _python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_table_names_a_file_with_main_for_every_command():
    names = [c.name for c in commands.COMMANDS]
    assert len(names) == len(set(names))
    required = {"train", "ppo", "prepare", "convert", "generate", "score", "pairs", "evaluate", "replicate", "demo",
                "estimate-memory", "precompute"}
    assert required <= set(names)
    for command in commands.COMMANDS:
        assert command.module == "megatron_tgdpo.cli." + command.name.replace("-", "_")
        path = PACKAGE / "cli" / f"{command.module.rpartition('.')[2]}.py"
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert mains, f"{path} has no main"
        assert [a.arg for a in mains[0].args.kwonlyargs][:1] == ["prog"], f"{path}: main(argv, *, prog)"
        assert "\n" not in command.summary and len(command.summary) <= 100


def test_help_lists_every_command_once_with_its_summary(capsys):
    assert dispatch.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in commands.COMMANDS:
        lines = [line for line in out.splitlines() if line.split()[:1] == [command.name]]
        assert len(lines) == 1 and lines[0].strip().endswith(command.summary), command.name


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert dispatch.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err and "did you mean `train`" in err
    assert dispatch.main([]) == 2  # no command: the usage, on stderr


def test_a_module_this_installation_lacks_is_one_line_and_exit_2(capsys):
    assert dispatch.run_module_main("megatron_tgdpo.no_such_module", ["--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "megatron_tgdpo.no_such_module" in err


def test_top_level_help_imports_no_command_and_no_torch():
    code = ("import sys, io, contextlib\n"
            "from megatron_tgdpo.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n"
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('megatron_tgdpo.cli.')]\n"
            "print(sorted(loaded))\n")
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['megatron_tgdpo.cli.commands', 'megatron_tgdpo.cli.dispatch']"


def test_dispatch_imports_only_the_chosen_command(capsys):
    before = {m for m in sys.modules if m.startswith("megatron_tgdpo.cli.")}
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["pairs", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: megatron-tgdpo pairs ")
    loaded = {m for m in sys.modules if m.startswith("megatron_tgdpo.cli.")} - before
    assert loaded <= {"megatron_tgdpo.cli.pairs"}
    others = [c.module for c in commands.COMMANDS if c.name != "pairs"]
    assert not [m for m in others if m in sys.modules and m not in before]


@pytest.mark.parametrize("name", ["prepare", "pairs", "score", "evaluate", "make-prompts", "convert", "plot",
                                  "synthetic-data"])
def test_each_light_command_help_names_the_command(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        dispatch.main([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: megatron-tgdpo {name} ")


def test_by_name_targets_are_what_the_command_files_import():
    for name, target in BY_NAME.items():
        module = importlib.import_module(f"megatron_tgdpo.cli.{name}")
        assert module.TARGET == target


def test_python_dash_m_and_the_old_tool_run_the_same_parser(tmp_path):
    new = _python("-m", "megatron_tgdpo", "pairs", "--help", cwd=tmp_path)
    old = _python(str(ROOT / "tools" / "build_pairs.py"), "--help", cwd=tmp_path)
    assert new.returncode == old.returncode == 0, new.stderr + old.stderr
    assert new.stdout.startswith("usage: megatron-tgdpo pairs ") and old.stdout.startswith("usage: build_pairs.py ")
    assert new.stdout.split("\n", 2)[2] == old.stdout.split("\n", 2)[2]  # the same flags and text after usage


def test_package_reads_nothing_from_the_repository_around_it():
    """No path into examples/ or tools/ and no parents[2] in the package: an installed wheel has neither."""
    def repository_part(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value.split("/")[0] in ("examples", "tools"))

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
                offenders.append(f"{where}: parents[...]")
            # A path built from the name: `x / "tools"`, Path("examples/..."), os.path.join(..., "tools", ...)
            operands = ([node.left, node.right] if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                        else node.args if isinstance(node, ast.Call) else [])
            offenders += [f"{where}: {o.value!r}" for o in operands if repository_part(o)]
    assert not offenders, "\n".join(offenders)
    # The checker sees the pattern it looks for.
    assert repository_part(ast.parse('ROOT / "tools"').body[0].value.right)
