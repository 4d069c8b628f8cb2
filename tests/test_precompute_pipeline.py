"""The precompute job end to end on a real Ray cluster (`ray_head`): exact outputs, resume, faults.

Real components: tiny randomly initialised diffusers AutoencoderKL saved with save_pretrained and
a tiny open_clip checkpoint, loaded through the job's own code path; ingest-format shards written
with webdataset's TarWriter. Expected values come from direct diffusers / open_clip calls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from latentforge import formats, storage
from latentforge.manifest import read_manifest
from latentforge.models.text_encoder import TINY_CLIP_NAME, save_tiny_clip_checkpoint
from tests.harness.tiny_models import save_tiny_autoencoder_kl
from latentforge.precompute.preprocess import iter_ingest_shard, preprocess_sample
from latentforge.pixels import to_pixels
from latentforge.tar_samples import iter_shard
from tests.harness.ingest_shards import write_ingest_shards
from tests.harness.ray_head import VENV_BIN

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    info = write_ingest_shards(root / "ingest", shard_sizes=(12, 12))
    return {
        "root": root,
        "ingest": info,
        "kl": save_tiny_autoencoder_kl(root / "kl"),
        "clip": save_tiny_clip_checkpoint(root / "clip.safetensors"),
    }


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def _args(data, out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--input", str(data["ingest"].dir), "--output", str(out),
            "--vae-type", "autoencoder_kl", "--vae", data["kl"], "--text-encoder-weights", data["clip"],
            "--text-layer", "penultimate", "--latent", "mean_std", "--dtype", "fp32",
            "--batch-size", "4", "--no-progress", *extra]


def _tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: storage.sha256_file(str(p)) for p in sorted(out.glob("*.tar"))}


def _keys(out: Path) -> list[str]:
    return sorted(k for p in sorted(out.glob("*.tar")) for k, _ in iter_shard(str(p)))


@pytest.fixture(scope="module")
def reference(data, ray_session, tmp_path_factory):
    """One clean in-process run on the cluster; later tests compare their tars with it byte for byte."""
    from jobs.precompute_latents import main

    out = tmp_path_factory.mktemp("reference") / "latents"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out.parent}/mlflow.db")
        assert main(_args(data, out)) == 0
    return out


def test_stored_arrays_equal_direct_diffusers_and_open_clip(data, reference) -> None:
    import open_clip
    from diffusers import AutoencoderKL

    info = data["ingest"]
    assert _keys(reference) == sorted(info.good)
    vae = AutoencoderKL.from_pretrained(data["kl"]).eval()
    clip = open_clip.create_model(TINY_CLIP_NAME, pretrained=data["clip"], weights_only=True).eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    for shard in ("00000", "00001"):
        inputs = {s.key: s for s in iter_ingest_shard(str(info.dir / f"{shard}.tar"))}
        for key, members in iter_shard(str(reference / f"{shard}.tar")):
            assert sorted(members) == ["json", "latent.npy", "pooled.npy", "text.npy", "txt"]
            status, image, record = preprocess_sample(inputs[key], 32, "bicubic", "center", 0, False)
            assert status == "ok"
            with torch.no_grad():
                dist = vae.encode(to_pixels(image[None])).latent_dist
            latent = torch.from_numpy(formats.decode_npy(members["latent.npy"]))
            assert latent.shape == (2, 4, 16, 16)
            torch.testing.assert_close(latent[0], ((dist.mean - shift) * scale)[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(latent[1], (dist.std * scale)[0], rtol=1e-5, atol=1e-5)

            caption = members["txt"].decode()
            assert caption == info.captions[key]
            tokens = tokenizer([caption])
            with torch.no_grad():  # open_clip's text forward, penultimate block then ln_final (SD 2)
                x = clip.token_embedding(tokens) + clip.positional_embedding
                for block in clip.transformer.resblocks[:-1]:
                    x = block(x, attn_mask=clip.attn_mask)
                states, pooled = clip.ln_final(x), clip.encode_text(tokens)
            meta = json.loads(members["json"])
            length = int((tokens[0] == tokenizer.eot_token_id).nonzero()[0]) + 1
            assert meta["text_length"] == length and meta["key"] == key
            assert meta["original_size"] == record["original_size"] and meta["target_size"] == [32, 32]
            assert meta["crop_top_left"] == record["crop_top_left"]
            text = torch.from_numpy(formats.decode_npy(members["text.npy"]))
            assert text.shape == (length, 32)
            torch.testing.assert_close(text, states[0, :length], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.from_numpy(formats.decode_npy(members["pooled.npy"])), pooled[0],
                                       rtol=1e-5, atol=1e-5)


def test_manifest_records_models_counts_and_lineage(data, reference) -> None:
    manifest = read_manifest(str(reference), stage="precompute")
    ingest_digest = storage.sha256_file(str(data["ingest"].dir / "manifest.json"))
    assert manifest.inputs == [{"uri": str(data["ingest"].dir), "sha256": ingest_digest, "kind": "manifest"}]
    assert manifest.models["vae"] == {"type": "autoencoder_kl", "id": data["kl"], "patch_size": 2,
                                      "scaling_factor": 0.5, "shift_factor": 0.1, "latent_channels": 4,
                                      "downsample": 2}
    assert manifest.models["text_encoder"] == {"name": TINY_CLIP_NAME, "weights": data["clip"],
                                               "layer": "penultimate", "context_length": 77, "width": 32,
                                               "pooled_dim": 32}
    assert manifest.models["weights"]["text_encoder"]["file"] == storage.sha256_file(data["clip"])
    assert manifest.counts == {"samples": 24, "ok": 20, "skipped_empty_caption": 2, "skipped_undecodable_image": 2,
                               "skipped": 4, "shards": 2}
    extra = manifest.extra
    assert (extra["dtype"], extra["latent"], extra["latent_shape"], extra["resolution"]) == ("fp32", "mean_std",
                                                                                             [4, 16, 16], 32)
    assert extra["preprocessing"]["range"] == [-1.0, 1.0] and extra["preprocessing"]["crop"] == "center"
    assert extra["fidelity"]["passed"] and extra["fidelity"]["samples"] == 8
    assert extra["fidelity"]["max_rel_error"] <= 1e-3
    for record in manifest.shards:
        assert record.sha256 == storage.sha256_file(str(reference / f"{record.name}.tar"))
        assert record.samples == 10 and record.stats["skipped"] == {"empty_caption": 1, "undecodable_image": 1}
        assert record.stats["input_sha256"] == data["ingest"].manifest.shard(record.name).sha256
        assert np.isfinite(record.stats["latent_mean"]) and record.stats["latent_std"] > 0
    for name in extra["empty_caption"]["files"]:
        assert extra["empty_caption"]["sha256"][name] == storage.sha256_file(str(reference / name))
    empty = formats.decode_npy((reference / "empty_text.npy").read_bytes())
    assert empty.shape == (2, 32) and formats.decode_npy((reference / "empty_pooled.npy").read_bytes()).shape == (32,)


def test_mlflow_run_has_config_counts_and_lineage(data, reference) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{reference.parent}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("latentforge.stage") == "precompute"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["vae_type"] == "autoencoder_kl" and run.data.params["text_layer"] == "penultimate"
    assert run.data.metrics["count.ok"] == 20 and run.data.metrics["count.skipped_undecodable_image"] == 2
    assert run.data.metrics["session.samples_per_s"] > 0
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["input", "output"]


def test_rerun_skips_finished_shards_and_refuses_other_settings(data, reference, capsys) -> None:
    from jobs.precompute_latents import main

    before = _tar_hashes(reference)
    mtimes = {p.name: p.stat().st_mtime_ns for p in reference.glob("*.tar")}
    assert main(_args(data, reference)) == 0
    assert "2 (2 kept from an earlier run)" in capsys.readouterr().out
    assert _tar_hashes(reference) == before
    assert {p.name: p.stat().st_mtime_ns for p in reference.glob("*.tar")} == mtimes
    assert main(_args(data, reference, "--text-layer", "last")) == 2
    assert "text_layer" in capsys.readouterr().err
    assert main(_args(data, reference, "--vae-type", "patchify")) == 2
    assert _tar_hashes(reference) == before


MANY_SHARDS = 8


@pytest.fixture(scope="module")
def many(data, ray_session, tmp_path_factory):
    """More shards than the fault tests could miss: the run is still going when the first is published."""
    from jobs.precompute_latents import main

    root = tmp_path_factory.mktemp("precompute-many")
    inputs = {**data, "ingest": write_ingest_shards(root / "ingest", shard_sizes=(12,) * MANY_SHARDS, seed=1)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        assert main(_args(inputs, root / "reference")) == 0
    return {**inputs, "reference": root / "reference"}


def _published(out: Path) -> int:
    return len(read_manifest(str(out)).shards) if (out / "manifest.json").exists() else 0


def _wait_until_published(out: Path, running: Callable[[], bool], timeout_s: float = 240) -> int:
    """Shards published once the first one is (polled every 10 ms while the job runs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        if published := _published(out):
            return published
        time.sleep(0.01)
    return 0


def _encoder_actor_pid(ray_head, running: Callable[[], bool], timeout_s: float = 180) -> int | None:
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        actors = list_actors(address=ray_head.dashboard_url, filters=[("state", "=", "ALIVE")],
                             raise_on_missing_output=False)
        encoders = [a for a in actors if "EncoderActor" in (a.class_name or "")]
        if encoders:
            return encoders[0].pid
        time.sleep(0.2)
    return None


def test_killed_encoder_actor_still_gives_exact_output(many, ray_head, ray_session, tmp_path) -> None:
    """The test SIGKILLs an encoder actor right after the first output shard is published."""
    from jobs.precompute_latents import main

    out = tmp_path / "latents"
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(_args(many, out, "--fidelity-samples", "2"))))
    thread.start()
    pid = _encoder_actor_pid(ray_head, thread.is_alive)
    published = _wait_until_published(out, thread.is_alive) if pid else 0
    if published:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=240)
    assert pid is not None, "no encoder actor was seen alive"
    assert 0 < published < MANY_SHARDS, f"the actor was killed after {published} of {MANY_SHARDS} shards"
    assert result.get("rc") == 0
    assert _tar_hashes(out) == _tar_hashes(many["reference"])


def _job_env(ray_head, **extra: str) -> dict[str, str]:
    env = ray_head.env(RAY_AUTH_MODE="token", **extra)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    return env


def test_killed_driver_resumes_to_the_exact_key_set(many, ray_head, tmp_path) -> None:
    """The test SIGKILLs the driver's process group right after its first published shard."""
    out = tmp_path / "latents"
    env = _job_env(ray_head, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    cmd = [sys.executable, "jobs/precompute_latents.py", *_args(many, out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        published = _wait_until_published(out, lambda: proc.poll() is None)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    at_kill = read_manifest(str(out))
    assert 0 < published <= len(at_kill.shards) < MANY_SHARDS, "the run had already finished"
    assert at_kill.extra["fidelity"] == {}
    kept = len(at_kill.shards)
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{MANY_SHARDS} ({kept} kept from an earlier run)" in rerun.stdout
    assert _keys(out) == sorted(many["ingest"].good)
    assert _tar_hashes(out) == _tar_hashes(many["reference"])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert len(read_manifest(str(out)).shards) == MANY_SHARDS


def test_fidelity_breach_fails_the_job(data, reference, ray_session, tmp_path, capsys) -> None:
    """Stored latents silently 1 % off (a bad kernel, a wrong factor) while the manifest still vouches
    for the files: the gate re-encodes in fp32, records the error and fails the job."""
    import shutil
    import tarfile

    from jobs.precompute_latents import main
    from latentforge.manifest import write_manifest
    from tests.harness.latent_shards import _tar_member as add_member

    out = tmp_path / "latents"
    shutil.copytree(reference, out)
    manifest = read_manifest(str(out))
    for record in manifest.shards:
        tar_path = out / f"{record.name}.tar"
        members = [(m.name, tarfile.open(tar_path).extractfile(m.name).read()) for m in tarfile.open(tar_path)]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, payload in members:
                if name.endswith(".latent.npy"):
                    payload = formats.encode_npy(formats.decode_npy(payload) * np.float32(1.01))
                add_member(tar, name, payload)
        record.sha256 = storage.sha256_file(str(tar_path))
    write_manifest(str(out), manifest)
    assert main(_args(data, out)) == 1
    assert "fidelity gate" in capsys.readouterr().err
    fidelity = read_manifest(str(out)).extra["fidelity"]
    assert fidelity["passed"] is False and fidelity["per_array"]["latent"] == pytest.approx(0.01, rel=0.05)
    assert fidelity["per_array"]["text"] <= 1e-3 and fidelity["samples"] == 8


def _hidden_install_python(tmp_path: Path) -> Path:
    """A Python that sees this venv's packages but NOT the editable latentforge install.

    A venv without pip whose site-packages has a plain path entry to ours: a path in a .pth file
    is added to sys.path, but the .pth files inside it (the editable finder) are not run.
    """
    venv = tmp_path / "no-latentforge"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    import site
    import sysconfig

    ours = sysconfig.get_paths()["purelib"]
    theirs = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(theirs, "latentforge-deps.pth").write_text(ours + "\n")
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u, torch, ray;"
                            "print(u.find_spec('latentforge'))"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "None", probe.stderr[-2000:]
    del site
    return venv / "bin" / "python"


@pytest.mark.parametrize("installed", [True, False], ids=["installed", "not-installed"])
def test_ray_job_submit(data, ray_head, tmp_path, installed: bool) -> None:
    out = tmp_path / "latents"
    runtime_env: dict = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}}
    if not installed:
        python = _hidden_install_python(tmp_path)
        runtime_env["py_executable"] = str(python)  # every worker of the job
        runtime_env["env_vars"]["PATH"] = f"{python.parent}{os.pathsep}{os.environ['PATH']}"  # the entrypoint
    submission = f"precompute-{'installed' if installed else 'bare'}-{os.getpid()}"
    cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", submission,
           "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/precompute_latents.py", "--preset", "tiny", "--input", str(data["ingest"].dir),
           "--output", str(out), "--text-encoder-weights", data["clip"], "--no-progress"]
    res = subprocess.run(cmd, cwd=REPO, env=_job_env(ray_head), capture_output=True, text=True, timeout=300)
    logs = res.stdout + res.stderr
    assert res.returncode == 0 and f"Job '{submission}' succeeded" in logs, logs[-4000:]
    status = subprocess.run([f"{VENV_BIN}/ray", "job", "status", "--address", ray_head.dashboard_url, submission],
                            env=_job_env(ray_head), capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    library = next(line for line in logs.splitlines() if line.startswith("library"))
    if installed:
        assert str(REPO / "platform" / "latentforge") in library
    else:  # imported from the uploaded working dir through pipelines/__init__.py's path entry
        assert str(REPO) not in library and "platform/latentforge" in library
    manifest = read_manifest(str(out), stage="precompute")
    assert manifest.models["vae"]["type"] == "patchify" and manifest.extra["latent_shape"] == [12, 16, 16]
    assert _keys(out) == sorted(data["ingest"].good)
    assert manifest.extra["fidelity"]["passed"]
