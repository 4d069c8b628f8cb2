"""FID: closed-form Fréchet distances, float64 statistics that merge exactly (batches and
processes), the Inception loader's hash/key checks, the N warning and the reference cache."""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import pytest
import torch

from latentforge.evaluation.fid import (FEATURE_DIM, INCEPTION_SHA256, FeatureStats, FidSampleSizeWarning,
                                        FidWeightsError, InceptionFeatures, cached_reference_stats, fid_from_stats,
                                        frechet_distance)
from latentforge.pixels import to_uint8


def _spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_identical_gaussians_have_zero_distance() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), _spd(16, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_equal_covariance_gives_squared_mean_distance() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.normal(size=32), rng.normal(size=32), _spd(32, rng)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-9)


def test_commuting_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, size=24), rng.uniform(0.1, 3, size=24)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(float(expected), rel=1e-9)


def test_rank_deficient_covariances_stay_finite() -> None:
    rng = np.random.default_rng(3)
    d = 64
    # Covariances of 5 samples in 64-d (rank 4), as with N < feature dim.
    s1 = FeatureStats(d).update(rng.normal(size=(5, d)))
    s2 = FeatureStats(d).update(rng.normal(size=(5, d)) + 1.0)
    value = frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov)
    assert np.isfinite(value) and value > 0
    # Singular diagonal case with a known answer.
    a = np.r_[np.zeros(8), rng.uniform(0.5, 2, 8)]
    b = np.r_[rng.uniform(0.5, 2, 8), np.zeros(8)]
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(16), np.diag(a), np.zeros(16), np.diag(b)) == pytest.approx(float(expected), rel=1e-9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fid_from_stats(s1, s2)
    assert out["fid_n"] == 5 and np.isfinite(out["fid"])
    assert any(issubclass(w.category, FidSampleSizeWarning) for w in caught)


def test_statistics_are_batch_size_independent() -> None:
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(101, 48)) * 3 + 5
    whole = FeatureStats(48).update(feats)
    for bs in (1, 7, 50):
        split = FeatureStats(48)
        for i in range(0, len(feats), bs):
            split.update(torch.from_numpy(feats[i:i + bs]))
        assert split.n == whole.n
        np.testing.assert_allclose(split.mean, whole.mean, rtol=1e-12)
        np.testing.assert_allclose(split.cov, whole.cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(whole.cov, np.cov(feats, rowvar=False), rtol=1e-9)
    merged = FeatureStats(48).update(feats[:30]).merge(FeatureStats(48).update(feats[30:]))
    other = FeatureStats(48).update(rng.normal(size=(60, 48)))
    assert fid_from_stats(merged, other)["fid"] == pytest.approx(fid_from_stats(whole, other)["fid"], rel=1e-10)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    from tests.harness.tiny_models import save_random_inception_weights

    path = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    return path, save_random_inception_weights(path, seed=0)


def test_inception_loader_checks_hash_and_keys(random_weights, tmp_path) -> None:
    path, sha = random_weights
    # The real file's hash is the default: random weights are refused, there is no fallback.
    with pytest.raises(FidWeightsError, match="no fallback"):
        InceptionFeatures(path)
    with pytest.raises(FidWeightsError, match="not found"):
        InceptionFeatures(str(tmp_path / "missing.pth"), sha)
    with pytest.raises(FidWeightsError, match="needs the Inception weights"):
        InceptionFeatures(None)
    state = torch.load(path, weights_only=True)
    state["fc.weight_renamed"] = state.pop("fc.weight")
    wrong_keys = str(tmp_path / "wrong_keys.pth")
    torch.save(state, wrong_keys)
    from latentforge import storage

    with pytest.raises(FidWeightsError, match="not an InceptionV3 FID state dict"):
        InceptionFeatures(wrong_keys, storage.sha256_file(wrong_keys))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = str(tmp_path / "evil.pth")
    torch.save({"x": Payload()}, evil)
    with pytest.raises(FidWeightsError, match="plain tensor state dict"):
        InceptionFeatures(evil, storage.sha256_file(evil))
    assert not (tmp_path / "pwned").exists()

    inc = InceptionFeatures(path, sha)
    assert inc.describe()["fid_weights_sha256"] == sha and "299x299" in inc.describe()["fid_resize"]
    images = (torch.rand(3, 3, 24, 24) * 255).to(torch.uint8)
    feats = inc(images)
    assert feats.shape == (3, FEATURE_DIM) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    assert INCEPTION_SHA256.startswith("6726825d")  # the file name's torch-hub hash prefix


def _worker(rank: int, world: int, port: int, weights: str, sha: str, images: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inc = InceptionFeatures(weights, sha)
        stats = FeatureStats(inc.dim)
        for batch in images[rank::world].split(2):  # each process: its own half, its own batches
            stats.update(inc(batch))
        stats.all_reduce()
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_two_process_evaluation_equals_single_process(random_weights, tmp_path) -> None:
    import torch.multiprocessing as mp

    path, sha = random_weights
    gen = torch.Generator().manual_seed(0)
    images = to_uint8(torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "merged.npz")
    mp.start_processes(_worker, args=(2, port, path, sha, images, out), nprocs=2, join=True, start_method="spawn")
    merged = FeatureStats.load(out)
    # One process, the same images in the same float32 forward batches, one set of sums.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = InceptionFeatures(path, sha).accumulate(list(images[0::2].split(2)) + list(images[1::2].split(2)))
    finally:
        torch.set_num_threads(threads)
    assert merged.n == single.n == 4
    np.testing.assert_allclose(merged.mean, single.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(merged.cov, single.cov, rtol=1e-9, atol=1e-15)
    ref = FeatureStats(FEATURE_DIM).update(np.random.default_rng(0).normal(0.3, 0.01, size=(4, FEATURE_DIM)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FidSampleSizeWarning)
        assert fid_from_stats(merged, ref)["fid"] == pytest.approx(fid_from_stats(single, ref)["fid"], rel=1e-9)


def test_reference_statistics_are_cached_by_content(tmp_path) -> None:
    calls = []

    def compute() -> FeatureStats:
        calls.append(1)
        return FeatureStats(4).update(np.arange(12, dtype=float).reshape(3, 4) ** 2)

    content = {"eval_set_manifest_sha256": "ab" * 32, "n": 3, "weights_sha256": "cd" * 32}
    a, path_a, hit_a = cached_reference_stats(str(tmp_path), content, compute)
    b, path_b, hit_b = cached_reference_stats(str(tmp_path), dict(content), compute)
    assert (hit_a, hit_b, len(calls), path_a == path_b) == (False, True, 1, True)
    np.testing.assert_array_equal(a.cov, b.cov)
    cached_reference_stats(str(tmp_path), {**content, "n": 4}, compute)
    assert len(calls) == 2
