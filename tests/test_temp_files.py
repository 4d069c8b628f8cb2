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
@pytest.mark.timeout(2700)  # it waits for the smoke demo (tests/harness/demo_run.py)
def test_the_whole_demo_leaves_the_temp_dir_as_it_found_it_and_no_mlflow_store(demo_smoke_run) -> None:
    """The smoke demo (ingest, autoencoder, precompute, base and upscaler training with in-training evals
    and exports, generate, evaluate) on its own embedded Ray, logging to a tracking server: the workers
    inherit TMPDIR, and no stage may fall back to a local ./mlruns store either."""
    assert "train: eval at step" in demo_smoke_run.log
    assert left_behind(demo_smoke_run.temp) == []
    assert [str(p) for p in demo_smoke_run.cwd.rglob("mlruns")] == []
    assert [str(p) for p in demo_smoke_run.out.rglob("mlruns")] == []
