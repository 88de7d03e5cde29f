"""Documentation that cannot drift from the code (in the spirit of sqlite-utils' documentation tests).

Every command and option of `m9` is in README.md; README's "Defaults and why" table holds the code's named
defaults; the `m9 …` commands the docs show parse (`--help` through click's CliRunner: no engine starts);
README's Layout section lists exactly the modules of m9/ and the repository's top-level folders.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from m9 import config
from m9.cli import main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
#: Markdown files whose `m9 …` examples must parse: README and the docs it links to.
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "infra" / "README.md"]


def _commands(
    group: click.Group = main, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command below main, depth first: (("data", "fashion-mnist"), command), …"""
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


COMMANDS = dict(_commands())


def _long_options(cmd: click.Command) -> list[str]:
    """The command's options as a user types them (the long form when there is one), without --help."""
    names = []
    for param in cmd.params:
        if isinstance(param, click.Option):
            longs = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
            names.extend(longs or param.opts)
    return [n for n in names if n != "--help"]


GLOBAL_OPTIONS = _long_options(main)


def _command_re(path: tuple[str, ...]) -> re.Pattern:
    """`m9 data fashion-mnist` as a whole command name (not `m9 data fashion-mnist-x`)."""
    return re.compile(r"\bm9 " + re.escape(" ".join(path)) + r"(?![\w-])")


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of a markdown section (any level), up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"README.md has no section '{heading}'"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


# ---------------------------------------------------------------------------------------------------------
# Every command and every option is in the README.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_command_is_in_the_readme(path: tuple[str, ...]) -> None:
    assert _command_re(path).search(_readme()), f"README.md never names `m9 {' '.join(path)}`"


@pytest.mark.parametrize(
    ("path", "option"),
    [(path, option) for path, cmd in COMMANDS.items() for option in _long_options(cmd)],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_every_option_is_on_its_commands_line_in_the_readme(path: tuple[str, ...], option: str) -> None:
    """On a line that names the command too: the Commands table's row is each command's full synopsis."""
    command = _command_re(path)
    option_re = re.compile(re.escape(option) + r"(?![\w-])")
    lines = [ln for ln in _readme().splitlines() if command.search(ln) and option_re.search(ln)]
    assert lines, f"README.md has no line naming both `m9 {' '.join(path)}` and {option}: add it to the Commands table"


@pytest.mark.parametrize("option", GLOBAL_OPTIONS)
def test_every_global_option_is_in_the_readme(option: str) -> None:
    paragraph = re.search(r"^Global options.*?(?:\n\n|\Z)", _readme(), re.MULTILINE | re.DOTALL)
    assert paragraph, "README.md has no paragraph starting 'Global options'"
    assert re.search(re.escape(option) + r"(?![\w-])", paragraph.group(0)), f"'Global options' does not name {option}"


# ---------------------------------------------------------------------------------------------------------
# The `m9 …` commands the docs show exist, with the options they show.
# ---------------------------------------------------------------------------------------------------------


def _shown_commands() -> Iterator[tuple[str, int, str, bool]]:
    """(file, line number, command text, fenced) for each `m9 …` the docs show: lines of fenced code blocks
    (commands to type) and inline code spans (synopses and commands named in prose) that start with `m9 `."""
    for doc in DOCS:
        fenced = False
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                for part in re.split(r"&&|;", line.split(" #", 1)[0]):
                    part = part.strip().removeprefix("$ ")
                    if part.startswith("m9 "):
                        yield doc.relative_to(REPO).as_posix(), number, part, True
            else:
                for span in re.findall(r"`(m9 [^`]+)`", line):
                    yield doc.relative_to(REPO).as_posix(), number, span.replace(r"\|", "|"), False


SHOWN = list(_shown_commands())

#: Placeholders in synopses (`--input SRC`, `[--per-class N]`, `m9 COMMAND`), not values one can run.
_PLACEHOLDER = re.compile(r"[\[\]…<>|]|^[A-Z][A-Z_]*$")


def _parse(text: str) -> tuple[list[str], tuple[str, ...], list[str]]:
    """(global options, command path, the rest) of a shown command: `m9 -v data fashion-mnist --output x`
    → (["-v"], ("data", "fashion-mnist"), ["--output", "x"])."""
    tokens = [t.strip("[]") for t in shlex.split(text)[1:]]
    before: list[str] = []
    path: tuple[str, ...] = ()
    while tokens:
        if (*path, tokens[0]) in COMMANDS:
            path = (*path, tokens.pop(0))
        elif not path and tokens[0] in ("-v", "--verbose", "--version"):
            before.append(tokens.pop(0))
        elif not path and tokens[0] == "--s3-endpoint" and len(tokens) > 1:
            before += [tokens.pop(0), tokens.pop(0)]
        else:
            break
    return before, path, tokens


@pytest.mark.parametrize(
    ("doc", "line", "text", "fenced"), SHOWN, ids=[f"{d}:{n}:{t.split()[1]}" for d, n, t, _ in SHOWN]
)
def test_shown_commands_exist_with_the_options_they_show(doc: str, line: int, text: str, fenced: bool) -> None:
    if text.split()[1] == "COMMAND":
        pytest.skip("`m9 COMMAND --help` is the pattern, not a command")
    before, path, rest = _parse(text)
    assert path, f"{doc}:{line}: `{text}` names no m9 command"
    known = set(_long_options(COMMANDS[path])) | set(GLOBAL_OPTIONS) | {"-v", "--help"}
    options = [m.group(0) for t in rest for m in [re.match(r"--?[a-z][a-z0-9-]*", t)] if m]
    unknown = [o for o in options if o not in known]
    assert not unknown, f"{doc}:{line}: `m9 {' '.join(path)}` has no option {', '.join(unknown)}"
    if fenced and not any(_PLACEHOLDER.search(t) for t in shlex.split(text)):
        # As shown, with --help right after the command: click parses every option (a missing value or a
        # bad choice fails), then prints the help and exits; the command itself never runs.
        result = CliRunner().invoke(main, [*before, *path, "--help", *rest])
        assert result.exit_code == 0, f"{doc}:{line}: `{text}` does not parse: {result.output}"


def test_the_docs_show_commands() -> None:
    """The parser above finds the examples (so the test above cannot pass by finding none)."""
    fenced = [t for _, _, t, f in SHOWN if f]
    assert len(SHOWN) > 20 and len(fenced) > 5, SHOWN


# ---------------------------------------------------------------------------------------------------------
# "Defaults and why" holds the code's named defaults.
# ---------------------------------------------------------------------------------------------------------


def _defaults_table() -> dict[str, str]:
    """README's "Defaults and why" table: first cell (backticks kept) → value cell."""
    rows = {}
    for line in _section(_readme(), "Defaults and why").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("default", "---"):
            rows[cells[0]] = cells[1]
    assert rows, "README.md's 'Defaults and why' table is empty"
    return rows


def _number(cell: str) -> float:
    """1,000 → 1000; 256 KiB → 262144."""
    match = re.fullmatch(r"`?([\d,]+(?:\.\d+)?)`?\s*(KiB|MiB)?", cell)
    assert match, f"not a number: {cell!r}"
    scale = {"KiB": 1024, "MiB": 1024**2, None: 1}[match.group(2)]
    return float(match.group(1).replace(",", "")) * scale


def _option_default(option: str) -> object:
    """The default of option, the same on every command that has it."""
    defaults = {
        " ".join(path): param.default
        for path, cmd in COMMANDS.items()
        for param in cmd.params
        if isinstance(param, click.Option) and option in param.opts
    }
    assert defaults, f"no m9 command has {option}"
    assert len({repr(v) for v in defaults.values()}) == 1, f"{option} has different defaults: {defaults}"
    return next(iter(defaults.values()))


#: m9.config's DEFAULT_* constants: each is the default of an option named after it (DEFAULT_BATCH_SIZE →
#: --batch-size), and has a row in the table.
NAMED_DEFAULTS = sorted(name for name in vars(config) if name.startswith("DEFAULT_"))


@pytest.mark.parametrize("name", NAMED_DEFAULTS)
def test_each_named_default_is_in_the_table_with_its_value(name: str) -> None:
    option = "--" + name.removeprefix("DEFAULT_").lower().replace("_", "-")
    value = getattr(config, name)
    table = _defaults_table()
    assert f"`{option}`" in table, f"README's 'Defaults and why' has no row for `{option}` (config.{name})"
    cell = table[f"`{option}`"]
    assert _option_default(option) == value, f"{option}'s default is not config.{name}"
    if name == "DEFAULT_ACTORS":  # machine-dependent: the README states the rule
        assert cell == "the number of cores" and value == max(1, os.cpu_count() or 1)
    elif isinstance(value, str):
        assert cell.strip("`") == value, f"README says {option} defaults to {cell}, the code {value!r}"
    else:
        assert _number(cell) == value, f"README says {option} defaults to {cell}, the code {value!r}"


def _plan_examples(cell: str) -> list[tuple[list[int], int, float]]:
    """'… (2 CPUs, 2 actors: 0.75; 2+4+4 CPUs, 4 actors: 2)' → [([2], 2, 0.75), ([2, 4, 4], 4, 2.0)]."""
    found = re.findall(r"(\d+(?:\+\d+)*) CPUs?, (\d+) actors?: (\d+(?:\.\d+)?)", cell)
    return [([int(n) for n in nodes.split("+")], int(actors), float(v)) for nodes, actors, v in found]


def test_the_other_rows_match_the_code() -> None:
    """Rows that are not an option: their value, or the worked examples they give, against the code."""
    from m9.stages.embed import plan_resources
    from m9.stages.ingest import ROW_GROUP_BYTES

    table = _defaults_table()
    checked = {f"`--{n.removeprefix('DEFAULT_').lower().replace('_', '-')}`" for n in NAMED_DEFAULTS}
    assert _number(table["Parquet row groups (ingest)"]) == ROW_GROUP_BYTES
    checked.add("Parquet row groups (ingest)")
    for row, which in (("CPUs claimed per actor (Ray)", 0), ("model threads per actor", 1)):
        examples = _plan_examples(table[row])
        assert len(examples) >= 2, f"the '{row}' row needs worked examples like '(2 CPUs, 2 actors: 0.75)'"
        for nodes, actors, value in examples:
            got = plan_resources(nodes, actors)[which]
            assert got == value, f"'{row}': {'+'.join(map(str, nodes))} CPUs, {actors} actors gives {got}, not {value}"
        checked.add(row)
    assert set(table) == checked, f"rows this test does not check: {sorted(set(table) - checked)}"


# ---------------------------------------------------------------------------------------------------------
# The Layout section lists exactly what exists.
# ---------------------------------------------------------------------------------------------------------


def _layout() -> set[str]:
    """Paths the Layout section lists: bullets of `name` (a folder ends in /), nested by indentation."""
    listed: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in _section((REPO / "docs" / "development.md").read_text(encoding="utf-8"), "Layout").splitlines():
        match = re.match(r"^(\s*)[-*] `([^`]+)`", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        assert not stack or parent.endswith("/"), f"Layout: {name} is listed under {parent}, which is not a folder"
        path = parent + name
        listed.add(path)
        stack.append((indent, path))
    return listed


def _modules(package: Path) -> set[str]:
    """m9/'s modules and packages (recursively), and the other files and folders m9 ships, as paths."""
    found = set()
    for entry in package.iterdir():
        rel = entry.relative_to(REPO).as_posix()
        if entry.name == "__pycache__" or entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.add(rel + "/")
            if (entry / "__init__.py").exists():
                found |= _modules(entry)
        else:
            found.add(rel)
    return found


def test_layout_lists_exactly_the_modules_of_m9() -> None:
    listed = {p for p in _layout() if p.startswith("m9/") and p != "m9/"}
    actual = _modules(REPO / "m9")
    missing = sorted(actual - listed)
    assert not missing, f"docs/development.md's Layout does not list {missing}: add each with a one-line role"
    gone = sorted(listed - actual)
    assert not gone, f"docs/development.md's Layout lists {gone}, which do not exist"


def test_layout_lists_the_top_level_folders() -> None:
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the tracked folders are unknown")
    folders = {f.split("/", 1)[0] + "/" for f in tracked if "/" in f and not f.startswith(".")}
    listed = {p for p in _layout() if p.count("/") == 1 and p.endswith("/")}
    assert folders == listed, (
        f"top-level folders {sorted(folders)}, docs/development.md's Layout lists {sorted(listed)}"
    )
