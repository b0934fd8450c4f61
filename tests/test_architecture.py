"""The shape the code keeps: the import layers hold (``.importlinter``, run by ``lint-imports`` in
``make test``) over every library module, and modules and functions stay a size a reader can hold."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blip_ops", "pipelines")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120
# Entries over a limit, each with its reason; the goal is an empty table.
ALLOWED: dict[str, str] = {}
# Above the commands: dispatches to them by module name (``blip-search <command>``).
ENTRY_POINTS = {"pipelines.cli"}


def _modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _oversized() -> dict[str, int]:
    found = {}
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            found[rel] = lines
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{rel}:{node.name}"] = length
    return found


def test_modules_and_functions_fit_their_limits():
    """Nothing over a limit unless ALLOWED names it, and ALLOWED names only what still is."""
    found = _oversized()
    over = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not over, (
        f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function: {over}"
    )
    stale = set(ALLOWED) - set(found)
    assert not stale, f"no longer over a limit, remove from ALLOWED: {sorted(stale)}"


def _contracts() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    return parser


def _names(section, key: str) -> set[str]:
    return {line.strip() for line in section[key].splitlines() if line.strip()}


def test_every_pipelines_module_is_a_command_or_in_the_library_contract():
    """A new package cannot escape the layers by not being named in the contract."""
    contracts = _contracts()
    commands = _names(contracts["importlinter:contract:commands-independent"], "modules")
    library = _names(contracts["importlinter:contract:library-below-commands"], "source_modules")
    assert commands == _names(
        contracts["importlinter:contract:library-below-commands"], "forbidden_modules"
    )
    top = {
        f"pipelines.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "pipelines").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert top == commands | library | ENTRY_POINTS, {
        "named in no contract": sorted(top - commands - library - ENTRY_POINTS),
        "named but missing": sorted((commands | library) - top),
    }
    assert not commands & library


def test_commands_are_entry_points_with_a_main():
    for name in _names(_contracts()["importlinter:contract:commands-independent"], "modules"):
        source = (ROOT / (name.replace(".", "/") + ".py")).read_text(encoding="utf-8")
        tree = ast.parse(source)
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
        assert 'if __name__ == "__main__":' in source, name


def test_the_console_script_dispatches_to_every_command(capsys):
    """``blip-search``: one entry per command, each resolving to the command module's ``main``."""
    from pipelines import cli

    commands = _names(_contracts()["importlinter:contract:commands-independent"], "modules")
    modules = {module for module, _ in cli.COMMANDS.values()}
    assert modules == commands | {"pipelines.config.cli"}
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in cli.COMMANDS)
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    assert cli.main(["config", "index.table=products"]) == 0  # underscores and dashes alike
    assert "index:" in capsys.readouterr().out
    script = Path(__import__("sys").executable).parent / "blip-search"
    assert script.is_file(), f"{script} missing: pyproject's [project.scripts] names blip-search"
