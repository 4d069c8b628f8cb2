"""The README tour, run as printed against a real token-authenticated Ray head.

Its `infra/submit.sh` commands are taken from README.md and run with bash, only made small
(`--steps`) and pointed at this test's directories (`/tmp/lf`, `demo_output/`, the scenes port).
The tour's set-up lines are done by the harness instead: `ray start --head` (RayHead, 3 CPUs as
printed), `make mlflow` (infra/mlflow/serve_local.sh itself, over this test's store) and the
exported RAY_ADDRESS / MLFLOW_TRACKING_URI. The test then asks the server `make mlflow` started
for the runs: every stage of the tour must be there. A job submitted without a tracking URI is
refused instead of logging into Ray's temporary copy of the working dir.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from latentforge.config import ConfigError
from latentforge.tracking import StageRun, check_store_outlives_job
from tests.harness.ray_head import RayHead, free_port, venv_env
from tests.harness.serve_local import ServeLocal
from tests.harness.documented_commands import bash_block_lines, logical_lines

REPO = Path(__file__).resolve().parent.parent
SMALLER = {"--steps 300": "--steps 3", "--steps 25": "--steps 2"}
TOUR_STAGES = {"ingest", "precompute", "train", "generate"}
# The tour's set-up lines, done here by the harness (RayHead, ServeLocal, the env of every command).
HARNESS_DOES = ("source .venv/bin/activate", "export RAY_AUTH_MODE=token", "ray get-auth-token", "ray start --head",
                "export RAY_ADDRESS=", "make mlflow", "export MLFLOW_TRACKING_URI=")


def test_default_store_in_a_ray_working_dir_copy_is_refused(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set.*make mlflow"):
        check_store_outlives_job()
    with pytest.raises(ConfigError):
        StageRun("ingest").__enter__()
    assert not (copy / "mlruns").exists()
    with StageRun("ingest", enabled=False):  # --no-mlflow: nothing to lose
        pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    check_store_outlives_job()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    check_store_outlives_job()  # a plain local run keeps its ./mlruns


def tour_lines() -> list[str]:
    """The README's bash lines from the tour's block (the one that submits jobs), continuations joined."""
    lines = [text for _, text in logical_lines(bash_block_lines(REPO / "README.md"))]
    first = next(i for i, text in enumerate(lines) if "infra/submit.sh" in text)
    start = max(i for i, text in enumerate(lines[:first]) if text.startswith("source .venv"))
    return [text for text in lines[start:] if text.strip() and not text.lstrip().startswith("#")]


def _localised(line: str, tmp: Path, scenes_port: int) -> str:
    line = line.replace("$PWD/demo_output", str(tmp / "demo_output"))
    line = re.sub(r"(?<![\w/])demo_output/", f"{tmp}/demo_output/", line)
    line = line.replace("/tmp/lf", str(tmp / "lf")).replace("--port 8000", f"--port {scenes_port}")
    for big, small in SMALLER.items():
        line = line.replace(big, small)
    return line


def _demo_inputs(tmp: Path) -> None:
    """What `make demo` leaves for the tour: scenes and the tiny text encoder's checkpoint."""
    from latentforge.demo.scenes import build_scene_set
    from latentforge.models.text_encoder import save_tiny_clip_checkpoint

    build_scene_set(tmp / "demo_output" / "scenes", rows=96, seed=0, image_size=64)
    save_tiny_clip_checkpoint(tmp / "demo_output" / "models" / "lf-tiny-clip.safetensors")


def _serve_scenes(line: str, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", "-c", line.rstrip().rstrip("&")], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()  # printed once the URL list is written
    assert first.startswith("serving "), first + proc.stdout.read()[-2000:] if proc.poll() is not None else first
    return proc


def _run(line: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def tour_cluster(tmp_path):
    temp_dir = Path("/tmp") / f"lf-tour-{os.getpid()}"  # short: Ray's socket paths
    temp_dir.mkdir(exist_ok=True)
    head = RayHead(temp_dir=temp_dir, num_cpus=3).start()
    try:
        server = ServeLocal(tmp_path / "mlruns")
        try:
            yield head, server
        finally:
            server.stop()
    finally:
        head.stop()


@pytest.mark.slow
def test_tour_runs_land_in_the_store_make_mlflow_serves(tour_cluster, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    head, server = tour_cluster
    _demo_inputs(tmp_path)
    env = venv_env(RAY_ADDRESS=head.dashboard_url, RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=server.url)
    lines = [_localised(line, tmp_path, free_port()) for line in tour_lines()]
    scenes_line = next(line for line in lines if "latentforge.demo" in line)
    submits = [line for line in lines if line.startswith("infra/submit.sh")]
    by_harness = [line for line in lines if line not in submits and line != scenes_line]
    assert all(line.startswith(HARNESS_DOES) for line in by_harness), by_harness
    scenes = _serve_scenes(scenes_line, env)
    try:
        for line in submits:
            done = _run(line, env)
            logs = done.stdout + done.stderr
            assert done.returncode == 0 and "succeeded" in done.stdout, f"{line}\n{logs[-4000:]}"
        refused = _run(f"ray job submit --working-dir . -- python jobs/precompute_latents.py --preset tiny --input "
                       f"{tmp_path}/lf/shards --output {tmp_path}/lf/refused --no-progress",
                       {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"})
    finally:
        os.killpg(scenes.pid, signal.SIGTERM)
        scenes.wait(timeout=30)
    assert refused.returncode != 0 and "MLFLOW_TRACKING_URI is not set" in refused.stdout + refused.stderr
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("latentforge")
    runs = client.search_runs([experiment.experiment_id])
    assert {run.data.tags.get("latentforge.stage") for run in runs} >= TOUR_STAGES
    assert all(run.info.status == "FINISHED" for run in runs if run.data.tags.get("latentforge.stage") in TOUR_STAGES)
    assert (tmp_path / "mlruns" / "mlflow.db").exists()  # the store serve_local.sh serves, nothing elsewhere
    assert not list(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/mlruns"))
