"""jobs/generate.py end to end (a real subprocess) and the Ray Data mode's resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.harness.tiny_export import build_tiny_export

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("gen_export"), vae="patchify", resolution=16)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO / "platform") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_generate_job_subprocess_txt2img_and_img2img(export, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seed": 42}\n{"prompt": "a blue square"}\n')
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "jobs" / "generate.py"), "--model", str(export.dir), "--prompts", str(prompts),
           "--out", str(out), "--sampler", "dpmsolver++", "--steps", "4", "--guidance", "3",
           "--negative-prompt", "blurry", "--seed", "7", "--batch-size", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated" in proc.stdout
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red circle", 42), ("a blue square", 8)]
    assert all(r["negative_prompt"] == "blurry" and r["sampler"] == "dpmsolver++" for r in rows)
    assert (out / "grid.png").exists() and (out / "manifest.json").exists()

    # img2img through the same job; a changed setting into the same dir is refused (exit 2).
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "init.png")
    proc = subprocess.run(cmd + ["--init-image", str(tmp_path / "init.png"), "--strength", "0.5"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "different settings" in proc.stderr
    out2 = tmp_path / "out_i2i"
    cmd2 = [c if c != str(out) else str(out2) for c in cmd] + ["--init-image", str(tmp_path / "init.png"),
                                                               "--strength", "0"]
    proc = subprocess.run(cmd2, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.asarray(Image.open(out2 / "000000.png")), np.full((16, 16, 3), 200, np.uint8))
    bad = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), "--prompts", "x"], cwd=tmp_path,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model" in bad.stderr


@pytest.mark.slow
def test_ray_generation_resumes(export, tmp_path, ray_session) -> None:
    from latentforge.generation.config import GenerateConfig
    from pipelines.generate import run

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(6)) + "\n")
    out = tmp_path / "ray_out"
    config = GenerateConfig(model=str(export.dir), prompts=str(prompts), out=str(out), sampler="ddim", steps=3,
                            guidance=2.0, batch_size=2, ray=True, concurrency=2, num_cpus_per_actor=1,
                            mlflow=False, progress=False, device="cpu")
    first = run(config)
    assert (first.generated, first.skipped) == (6, 0)
    before = {p.name: p.read_bytes() for p in out.glob("0*.png")}
    assert len(before) == 6
    # Lose two outputs and the index (as a killed run would): the rerun redoes exactly those.
    (out / "000001.png").unlink()
    (out / "000004.png").unlink()
    (out / "index.jsonl").unlink()
    second = run(config)
    assert (second.generated, second.skipped) == (2, 4)
    after = {p.name: p.read_bytes() for p in out.glob("0*.png")}
    assert after == before  # deterministic per seed, across actors and runs
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    third = run(config)
    assert (third.generated, third.skipped) == (0, 6)
