"""Every job command line the project deploys or documents starts as it is written.

Sources: the RayJob entrypoints and the commented commands in infra/ (cluster.yaml,
raycluster.yaml, submit.sh), and the bash blocks of README.md and docs/*.md (line continuations
joined, `ray job submit ... -- python jobs/X.py ...` and `infra/submit.sh -- ...` unwrapped).
Each command goes through its job's own parser and config validation (`--print-config`, which
exits 2 on a bad flag or value), then through the checks the job makes before it starts work:
required paths, and for training the storage check with the number of machines the deployment
declares. A command that would exit 2 on the cluster fails here.
"""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from jobs import _bootstrap
from latentforge.config import parse_config
from latentforge.precompute.config import PrecomputeConfig
from latentforge.training import runs
from latentforge.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
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
    """Runs from Ray's copy of the working dir (`ray job submit`, `infra/submit.sh`)."""


def _command(line: str, source: str, machines: int) -> Command | None:
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


def _logical_lines(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined."""
    pending, start = "", 0
    for number, line in enumerate(lines, 1):
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _bash_block_lines(path: Path) -> list[str]:
    """The file's lines with everything outside ```bash blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
            out.append("")
        else:
            out.append(line if fence in BASH_FENCES else "")
    return out


def _comment_lines(path: Path) -> list[str]:
    return [line.strip()[1:] if line.strip().startswith("#") else "" for line in path.read_text().splitlines()]


def _commands_in(lines: list[str], name: str, machines: int) -> list[Command]:
    found = (_command(text, f"{name}:{number}", machines) for number, text in _logical_lines(lines))
    return [command for command in found if command is not None]


def _rayjob_commands() -> list[Command]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayJob":
                groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                machines = sum(group["maxReplicas"] for group in groups)
                out += _commands_in([doc["spec"]["entrypoint"]], f"k8s/{path.name}:entrypoint", machines)
    return out


def largest_cluster() -> int:
    """Most worker machines any standing cluster in infra/ can have (docs' cluster commands run there)."""
    launcher = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    kuberay = next(d for d in yaml.safe_load_all((INFRA / "k8s" / "raycluster.yaml").read_text())
                   if d and d.get("kind") == "RayCluster")
    return max(launcher["max_workers"], sum(g["maxReplicas"] for g in kuberay["spec"]["workerGroupSpecs"]))


def documented_commands() -> list[Command]:
    cluster = largest_cluster()
    out = _rayjob_commands()
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh")):
        out += _commands_in(_comment_lines(path), path.relative_to(REPO).as_posix(), cluster)
    out += _commands_in(_bash_block_lines(REPO / "README.md"), "README.md", 1)  # a local head / embedded Ray
    for path in sorted((REPO / "docs").glob("*.md")):
        out += _commands_in(_bash_block_lines(path), f"docs/{path.name}", cluster)
    return out


COMMANDS = documented_commands()


def test_the_commands_are_found() -> None:
    sources = {command.source.split(":")[0] for command in COMMANDS}
    assert {"k8s/rayjob-train.yaml", "k8s/rayjob-precompute.yaml", "infra/ray/cluster.yaml",
            "infra/k8s/raycluster.yaml", "README.md", "docs/operations.md"} <= sources
    readme_jobs = [command.argv[0] for command in COMMANDS if command.source.startswith("README.md")]
    assert {"jobs/download_images.py", "jobs/precompute_latents.py", "jobs/train.py",
            "jobs/generate.py"} <= set(readme_jobs)


def test_line_continuations_and_submit_wrappers_are_unwrapped() -> None:
    text = ["ray job submit --working-dir . -- python jobs/train.py --preset tiny \\",
            '    --data "$PWD/x y" ... --steps 3 &   # trailing comment']
    (command,) = _commands_in(text, "t", 2)
    assert command == Command("t:1", ("jobs/train.py", "--preset", "tiny", "--data", f"{REPO}/x y", "--steps", "3"),
                              2, True)
    assert _commands_in(["python jobs/<stage>.py [flags...]"], "t", 1) == []


def _exit_code(argv: list[str]) -> int:
    main = importlib.import_module(f"jobs.{Path(argv[0]).stem}").main
    try:
        return int(main(argv[1:]) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def _train_checks(command: Command, flags: list[str]) -> None:
    config = parse_config(TrainConfig, flags, preset_dir=_bootstrap.PRESETS / "train")
    assert config.data, "train refuses to start without --data"
    machines = [f"10.0.0.{i}" for i in range(command.machines)]
    runs.check_storage(config.storage_path, machines, config.storage_is_shared)


def _precompute_checks(command: Command, flags: list[str]) -> None:
    parse_config(PrecomputeConfig, flags, preset_dir=_bootstrap.PRESETS / "precompute").require_paths()


BEFORE_START = {"jobs/train.py": _train_checks, "jobs/precompute_latents.py": _precompute_checks}


def _relative_paths(flags: list[str]) -> list[str]:
    return [flag for flag in flags if "/" in flag and not flag.startswith(("/", "-")) and "://" not in flag]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.source for c in COMMANDS])
def test_documented_command_passes_the_jobs_own_checks(command: Command, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "jobs"))  # as `python jobs/X.py` has it
    script, flags = command.argv[0], list(command.argv[1:])
    assert (REPO / script).is_file(), f"{command.source}: {script} does not exist"
    if "--help" in flags or "--print-config" in flags:
        assert _exit_code(command.argv) == 0, f"{command.source}: {capsys.readouterr().err}"
        return
    assert _exit_code([*command.argv, "--print-config"]) == 0, f"{command.source}: {capsys.readouterr().err}"
    if command.submitted:  # Ray's working-dir copy has neither the caller's cwd nor ignored files
        assert not _relative_paths(flags), f"{command.source}: relative paths in a submitted job"
    if script in BEFORE_START:
        BEFORE_START[script](command, flags)
