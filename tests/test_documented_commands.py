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
from pathlib import Path
from typing import Callable

import pytest

from jobs import _bootstrap
from latentforge.autoencoder.config import AutoencoderTrainConfig
from latentforge.config import parse_config
from latentforge.precompute.config import PrecomputeConfig
from latentforge.training import run_storage
from latentforge.training.config import TrainConfig
from tests.harness.documented_commands import REPO, Command, commands_in, documented_commands

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
    (command,) = commands_in(text, "t", 2)
    assert command == Command("t:1", ("jobs/train.py", "--preset", "tiny", "--data", f"{REPO}/x y", "--steps", "3"),
                              2, True)
    assert commands_in(["python jobs/<stage>.py [flags...]"], "t", 1) == []


def _exit_code(argv: list[str]) -> int:
    main = importlib.import_module(f"jobs.{Path(argv[0]).stem}").main
    try:
        return int(main(argv[1:]) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def _training_checks(config_class: type, preset_dir: str) -> Callable[[Command, list[str]], None]:
    """Training jobs refuse to start without --data, or with node-local storage on several machines."""
    def check(command: Command, flags: list[str]) -> None:
        config = parse_config(config_class, flags, preset_dir=_bootstrap.PRESETS / preset_dir)
        assert config.data, f"{command.argv[0]} refuses to start without --data"
        machines = [f"10.0.0.{i}" for i in range(command.machines)]
        run_storage.check_storage(config.storage_path, machines, config.storage_is_shared)
    return check


def _precompute_checks(command: Command, flags: list[str]) -> None:
    parse_config(PrecomputeConfig, flags, preset_dir=_bootstrap.PRESETS / "precompute").check_required()


BEFORE_START = {"jobs/train.py": _training_checks(TrainConfig, "train"),
                "jobs/train_autoencoder.py": _training_checks(AutoencoderTrainConfig, "train_autoencoder"),
                "jobs/precompute_latents.py": _precompute_checks}


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
