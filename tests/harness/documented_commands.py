"""Job command lines as written in infra/ (RayJob entrypoints, comments), README.md and docs/*.md.

Shell lines are read as bash would split them: backslash continuations joined, comments and
`...` placeholders dropped, `ray job submit ... --` / `infra/submit.sh ... --` wrappers and a
trailing `&` removed, `$PWD` expanded to the checkout (the commands are run from its root).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
INFRA = REPO / "infra"
JOB_SCRIPT = re.compile(r"^jobs/\w+\.py$")
MENTIONS_A_JOB = re.compile(r"(^|\s)jobs/\w+\.py(\s|$)")
SHELL_OPERATORS = {"&", "&&", "|", "||", ";"}
BASH_FENCES = {"bash", "sh", "shell"}


@dataclass(frozen=True)
class Command:
    source: str
    """file:line where the command is written (the test id)."""
    argv: tuple[str, ...]
    """The job script and its flags, as the shell would pass them."""
    machines: int
    """Machines the deployment gives the job (its workers may land on each)."""
    submitted: bool
    """Runs from Ray's copy of the working dir (`ray job submit`, `infra/submit.sh`); else where it is typed."""


def parse_command(line: str, source: str, machines: int) -> Command | None:
    if not MENTIONS_A_JOB.search(line):  # prose in comments need not be shell syntax
        return None
    tokens = shlex.split(line, comments=True)
    script = next((i for i, token in enumerate(tokens) if JOB_SCRIPT.match(token)), None)
    if script is None:
        return None
    argv: list[str] = []
    for token in tokens[script:]:
        if token in SHELL_OPERATORS:
            break
        if token != "...":  # a documented placeholder for "your other flags"
            argv.append(token.replace("${PWD}", str(REPO)).replace("$PWD", str(REPO)))
    submitted = any(token == "submit" or token.endswith("submit.sh") for token in tokens[:script])
    return Command(source, tuple(argv), machines, submitted)


def logical_lines(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined."""
    pending, start = "", 0
    for number, line in enumerate(lines, 1):
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def bash_block_lines(path: Path) -> list[str]:
    """The file's lines with everything outside ```bash blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
            out.append("")
        else:
            out.append(line if fence in BASH_FENCES else "")
    return out


def comment_lines(path: Path) -> list[str]:
    return [line.strip()[1:] if line.strip().startswith("#") else "" for line in path.read_text().splitlines()]


def commands_in(lines: list[str], name: str, machines: int) -> list[Command]:
    """Commands in `lines`; submitted ones get `machines`, a plain `python jobs/X.py` its embedded Ray's one."""
    found = (parse_command(text, f"{name}:{number}", machines) for number, text in logical_lines(lines))
    return [command if command.submitted else replace(command, machines=1) for command in found if command]


def rayjob_commands() -> list[Command]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayJob":
                groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                machines = sum(group["maxReplicas"] for group in groups)
                (command,) = commands_in([doc["spec"]["entrypoint"]], f"k8s/{path.name}:entrypoint", 1)
                out.append(replace(command, machines=machines))  # the RayJob's cluster runs it
    return out


def largest_cluster() -> int:
    """Most worker machines any standing cluster in infra/ can have (docs' cluster commands run there)."""
    launcher = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    kuberay = next(d for d in yaml.safe_load_all((INFRA / "k8s" / "raycluster.yaml").read_text())
                   if d and d.get("kind") == "RayCluster")
    return max(launcher["max_workers"], sum(g["maxReplicas"] for g in kuberay["spec"]["workerGroupSpecs"]))


def documented_commands() -> list[Command]:
    cluster = largest_cluster()
    out = rayjob_commands()
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh")):
        out += commands_in(comment_lines(path), path.relative_to(REPO).as_posix(), cluster)
    out += commands_in(bash_block_lines(REPO / "README.md"), "README.md", 1)  # a local head / embedded Ray
    for path in sorted((REPO / "docs").glob("*.md")):
        out += commands_in(bash_block_lines(path), f"docs/{path.name}", cluster)
    return out
