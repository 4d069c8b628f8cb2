"""No stage leaves anything in the temp dir, in the driver or in any Ray worker.

Each check points the temp dir (TMPDIR, or `tempfile.tempdir` in-process) at a fresh directory
and asserts that nothing is left in it but torch's per-user compile cache (`torchinductor_<user>`,
made when torch._dynamo is imported and reused by every later process, like ~/.cache). Ray's
own session files go to RAY_TMPDIR, elsewhere: they are Ray's, kept for its logs, and Ray
falls back to TMPDIR when RAY_TMPDIR is unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness.ray_head import venv_env
from tests.harness.tiny_export import build_tiny_export

REPO = Path(__file__).resolve().parent.parent


def left_behind(temp: Path) -> list[str]:
    return sorted(name for name in os.listdir(temp) if not name.startswith("torchinductor_"))


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """This process's temp dir, fresh and empty."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_loading_a_remote_export_leaves_no_copy(tmp_path, scratch) -> None:
    import fsspec

    from latentforge.generation import load_export

    export = build_tiny_export(tmp_path / "run", vae="patchify", resolution=16)
    memory = fsspec.filesystem("memory")
    memory.put(str(export.dir), "/exports/tiny", recursive=True)
    try:
        model = load_export("memory://exports/tiny")
        assert model.export_dir == "memory://exports/tiny" and model.step == 7
        assert sum(p.numel() for p in model.unet.parameters()) > 0  # the weights outlive the copy
    finally:
        memory.rm("/exports", recursive=True)
    assert left_behind(scratch) == []


def test_a_worker_that_resizes_images_and_encodes_text_imports_no_wandb(tmp_path) -> None:
    """What Ray ingest and precompute workers load (img2dataset's resizer, an open_clip text encoder),
    then an exit without interpreter clean-up, as Ray workers end: wandb (imported by img2dataset's
    package and by timm) would have left its two temp dirs."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    code = ("import io, os, sys\n"
            "from PIL import Image\n"
            "from latentforge.ingest.config import IngestConfig\n"
            "from latentforge.ingest.images import ImageProcessor\n"
            "from latentforge.models.text_encoder import load_text_encoder, save_tiny_clip_checkpoint\n"
            "buf = io.BytesIO(); Image.new('RGB', (40, 30), 'red').save(buf, format='JPEG')\n"
            "result = ImageProcessor(IngestConfig(input='x', output='y', image_size=16)).process(buf.getvalue())\n"
            "assert result.status == 'ok', result\n"
            f"clip = save_tiny_clip_checkpoint({str(tmp_path / 'clip.safetensors')!r})\n"
            "states, lengths, pooled = load_text_encoder('lf-tiny-clip', clip).encode(['a red circle'])\n"
            "print('wandb' in sys.modules, flush=True)\n"
            "os._exit(0)  # as a Ray worker ends: no atexit, no finalizers\n")
    proc = subprocess.run([sys.executable, "-c", code], env=venv_env(TMPDIR=str(temp)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
    assert left_behind(temp) == []


@pytest.mark.slow
def test_the_whole_pipeline_leaves_the_temp_dir_as_it_found_it_and_no_mlflow_store(tmp_path) -> None:
    """The demo (ingest, autoencoder, precompute, train with in-training evals and its diffusers export,
    generate) on its own embedded Ray,
    with --no-mlflow: the workers inherit TMPDIR, and no stage may create ./mlruns either."""
    temp, work = tmp_path / "tmp", tmp_path / "work"
    temp.mkdir()
    work.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="lfray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = venv_env(TMPDIR=str(temp), RAY_TMPDIR=ray_tmp, RAY_raylet_start_wait_time_s="120")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LATENTFORGE_PIPELINE_RUN_ID"):
        env.pop(key, None)
    try:
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "demo.py"), "--preset", "smoke",
                               "--out", str(work / "demo_output"), "--no-mlflow",
                               # every stage once, not the preset's learning run: 12 steps, evals at 6
                               "--steps", "12", "--batch-size", "8", "--eval-every", "6", "--checkpoint-every", "6",
                               "--autoencoder-steps", "12"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "train: eval at step 6" in log and "MLflow: off (--no-mlflow)" in log
    assert left_behind(temp) == []
    assert [str(p) for p in work.rglob("mlruns")] == []
