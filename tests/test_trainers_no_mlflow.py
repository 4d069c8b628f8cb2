"""`--no-mlflow` in every trainer (the UNet's and the autoencoder's share one driver and one worker skeleton).

For each trainer, on the real Ray head (`ray_session`) through the job's own `main(argv)`:
a tracked run (sqlite store), then the same run name resumed with `--no-mlflow` and more steps,
then a fresh run with `--no-mlflow`. Without MLFLOW_TRACKING_URI any MLflow call of the driver
would create ./mlruns in its working directory, which must stay without it; the resumed run's
checkpoint names the tracked run, which no worker may reattach: the export names no run and the
tracked run gets no metric from the resumed steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from latentforge import tracking
from latentforge.manifest import read_manifest
from tests.harness.ingest_shards import write_ingest_shards
from tests.harness.latent_shards import write_latent_dataset

pytestmark = pytest.mark.slow
FIRST_STEPS, RESUMED_STEPS = 2, 4


def _unet(root: Path, run_name: str, steps: int) -> list[str]:
    return ["--preset", "tiny", "--data", str(root / "data"), "--steps", str(steps), "--batch-size", "4",
            "--checkpoint-every", "1", "--eval-every", "0", "--log-every", "1", "--storage-path",
            str(root / "runs"), "--run-name", run_name]


def _autoencoder(root: Path, run_name: str, steps: int) -> list[str]:
    return ["--preset", "tiny", "--data", str(root / "data"), "--resolution", "16", "--steps", str(steps),
            "--batch-size", "4", "--checkpoint-every", "1", "--eval-every", "1", "--val-samples", "2",
            "--scale-samples", "4", "--log-every", "1", "--storage-path", str(root / "runs"), "--run-name", run_name]


TRAINERS = {
    # job, its export's manifest stage, its argv, how to write its input data
    "unet": ("train", "train", _unet, lambda out: write_latent_dataset(out, shard_sizes=[16], width=16)),
    "autoencoder": ("train_autoencoder", "autoencoder", _autoencoder,
                    lambda out: write_ingest_shards(out, shard_sizes=(8, 8))),
}


def _main(job: str):
    from jobs.demo import load_job  # loads jobs/<name>.py as `python jobs/<name>.py` would

    return load_job(job)


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def runs(request, ray_session, tmp_path_factory):
    """One trainer's three runs: tracked, resumed with --no-mlflow, fresh with --no-mlflow."""
    job, stage, argv, write_data = TRAINERS[request.param]
    root = tmp_path_factory.mktemp(f"no_mlflow_{request.param}")
    write_data(root / "data")
    store = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        tracked = _main(job)(argv(root, "tracked", FIRST_STEPS))
        tracked_export = read_manifest(str(root / "runs" / "tracked" / "export"), stage=stage)
        patch.delenv("MLFLOW_TRACKING_URI")
        patch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
        (root / "cwd").mkdir()
        patch.chdir(root / "cwd")  # any MLflow call of the driver would create ./mlruns here
        resumed = _main(job)([*argv(root, "tracked", RESUMED_STEPS), "--no-mlflow"])
        fresh = _main(job)([*argv(root, "fresh", FIRST_STEPS), "--no-mlflow"])
    return {"root": root, "store": store, "stage": stage, "codes": (tracked, resumed, fresh),
            "tracked_run_id": tracked_export.extra["mlflow_run_id"]}


def test_the_runs_succeed_and_the_first_is_tracked(runs) -> None:
    assert runs["codes"] == (0, 0, 0)
    assert runs["tracked_run_id"]  # the precondition: the checkpoint the resume starts from names a run


def test_a_no_mlflow_resume_never_reattaches_the_checkpoints_run(runs) -> None:
    from mlflow.tracking import MlflowClient

    export = read_manifest(str(runs["root"] / "runs" / "tracked" / "export"), stage=runs["stage"])
    assert export.extra["step"] == RESUMED_STEPS  # it did resume and train on
    assert export.extra["mlflow_run_id"] is None
    client = MlflowClient(tracking_uri=runs["store"])
    history = client.get_metric_history(runs["tracked_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, FIRST_STEPS + 1))  # nothing from the resumed steps
    assert client.get_run(runs["tracked_run_id"]).info.status == "FINISHED"


def test_a_fresh_no_mlflow_run_makes_no_mlflow_call(runs) -> None:
    export = read_manifest(str(runs["root"] / "runs" / "fresh" / "export"), stage=runs["stage"])
    assert export.extra["step"] == FIRST_STEPS and export.extra["mlflow_run_id"] is None
    assert not (runs["root"] / "cwd" / "mlruns").exists()
