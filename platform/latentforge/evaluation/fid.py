"""FID with the standard `pt_inception-2015-12-05` InceptionV3 (the pytorch-fid / torch-fidelity /
torchmetrics weights), loaded from a local file whose sha256 is checked and recorded.

What is fixed here, and why:

* Feature extractor: torch-fidelity's `FeatureExtractorInceptionV3` (the port of the TF FID graph
  that torchmetrics also wraps), pool3 features, 2048-d. Its weights are the file
  `weights-inception-2015-12-05-6726825d.pth` (= pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`),
  sha256 `INCEPTION_SHA256`. A file with another hash is refused: there is NO fallback to other
  weights (torchvision's ImageNet InceptionV3 gives different, non-comparable numbers). Before the
  library loads it, the file must also load with `torch.load(weights_only=True)` (plain tensors,
  no code in the pickle) and carry exactly the expected keys.
* Resize path (`RESIZE_PATH`): images enter as uint8 RGB (B, 3, H, W); torch-fidelity resizes them
  to 299x299 with its TF1-compatible bilinear interpolation (align_corners=False, no antialias),
  the same as the original TF FID code, then maps [0, 255] to [-1, 1].
* Statistics are accumulated in float64 as (n, sum, sum of outer products), so any split into
  batches or processes (`FeatureStats.merge`, `FeatureStats.all_reduce`) gives the same mean and
  covariance; N is returned with every FID and a warning is raised when N < the feature
  dimension (the covariance is then rank-deficient and FID is strongly biased upwards).
* The Fréchet distance is torchmetrics' `_compute_fid` (trace of sqrt(Σ1Σ2) from the eigenvalues
  of Σ1Σ2, real part), evaluated in float64; it stays finite for rank-deficient covariances.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from latentforge import storage

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05"
INCEPTION_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FEATURE_DIM = 2048
FEATURE_LAYER = "2048"
DOWNLOAD = "download"
RESIZE_PATH = ("uint8 RGB -> torch-fidelity FeatureExtractorInceptionV3: TF1-compatible bilinear resize "
               "to 299x299 (align_corners=False, no antialias) -> (x-128)/128 -> pool3 (2048-d)")


class FidWeightsError(RuntimeError):
    """The Inception weights are missing, have the wrong hash or the wrong contents."""


class FidSampleSizeWarning(UserWarning):
    """FID computed from fewer samples than the feature dimension."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

@dataclass
class FeatureStats:
    """Running float64 sums of features: enough for the mean and covariance, mergeable exactly."""

    dim: int
    n: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim, dtype=np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> "FeatureStats":
        f = features.detach().to("cpu", torch.float64).numpy() if isinstance(features, torch.Tensor) \
            else np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("non-finite features")
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d stats into {self.dim}-d stats")
        self.n += other.n
        self.total += other.total
        self.outer += other.outer
        return self

    def all_reduce(self, group: Any = None) -> "FeatureStats":
        """Sum the statistics of every rank of the default torch.distributed group (in place)."""
        import torch.distributed as dist

        flat = torch.from_numpy(np.concatenate([[float(self.n)], self.total, self.outer.ravel()]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        arr = flat.numpy()
        self.n = int(round(arr[0]))
        self.total = arr[1:1 + self.dim].copy()
        self.outer = arr[1 + self.dim:].reshape(self.dim, self.dim).copy()
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.n, 1)

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (n - 1), as pytorch-fid / torchmetrics use."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        mu = self.mean
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str) -> None:
        """Write mean/cov/n (and the raw sums) as a pickle-free .npz, atomically."""
        import io

        buffer = io.BytesIO()
        np.savez(buffer, n=np.int64(self.n), total=self.total, outer=self.outer, mu=self.mean,
                 sigma=self.cov if self.n >= 2 else np.zeros_like(self.outer))
        storage.atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            total = np.array(data["total"], dtype=np.float64)
            return cls(dim=total.shape[0], n=int(data["n"]), total=total,
                       outer=np.array(data["outer"], dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------

def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), via torchmetrics' eigenvalue formulation.

    Tr((Σ1Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1Σ2, which are real and
    non-negative for PSD inputs; round-off negatives become imaginary roots whose real part is 0,
    so rank-deficient covariances give a finite number (scipy's sqrtm can return NaN/complex there).
    """
    from torchmetrics.image.fid import _compute_fid

    t = [torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (mu1, sigma1, mu2, sigma2)]
    if t[0].shape != t[2].shape or t[1].shape != t[3].shape:
        raise ValueError("mean/covariance shapes differ between the two sets")
    value = float(_compute_fid(t[0], t[1], t[2], t[3]))
    if not np.isfinite(value):
        raise FloatingPointError("Fréchet distance is not finite")
    return value


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> dict[str, Any]:
    """FID between two accumulated feature sets, with N of each side; warns when N < dim."""
    for name, s in (("generated", a), ("reference", b)):
        if s.n < s.dim:
            msg = (f"FID {name} set has N={s.n} samples < feature dim {s.dim}: the covariance is "
                   "rank-deficient and the FID is biased upwards; compare only numbers with the same N")
            warnings.warn(msg, FidSampleSizeWarning, stacklevel=2)
            log.warning(msg)
    value = frechet_distance(a.mean, a.cov, b.mean, b.cov)
    return {"fid": value, "fid_n": a.n, "fid_reference_n": b.n}


# --------------------------------------------------------------------------------------------
# Inception weights and feature extractor
# --------------------------------------------------------------------------------------------

def _inception_class() -> Any:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:  # pragma: no cover - it is a project dependency
        raise FidWeightsError("FID needs torch-fidelity (pip install torch-fidelity)") from exc
    return FeatureExtractorInceptionV3


def download_inception_weights() -> str:
    """Fetch the standard weights into torch hub's cache (only when the network allows it)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), hash_prefix=INCEPTION_SHA256[:8])
    return str(target)


def verify_inception_weights(path: str, expected_sha256: str = INCEPTION_SHA256) -> str:
    """Check the file's sha256 and that it is a plain tensor state dict; returns the sha256."""
    if not os.path.isfile(path):
        raise FidWeightsError(f"FID Inception weights not found: {path}")
    digest = storage.sha256_file(path)
    if digest != expected_sha256.lower():
        raise FidWeightsError(
            f"{path}: sha256 {digest} is not the expected {INCEPTION_WEIGHTS_NAME} hash {expected_sha256}; "
            "refusing to compute FID with other weights (there is no fallback)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal means "not a plain state dict"
        raise FidWeightsError(f"{path}: not a plain tensor state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FidWeightsError(f"{path}: not a state dict of tensors")
    return digest


class InceptionFeatures:
    """pool3 features of the standard FID InceptionV3; call with uint8 images (B, 3, H, W)."""

    def __init__(self, weights: str | None, expected_sha256: str = INCEPTION_SHA256,
                 device: str | torch.device = "cpu") -> None:
        if weights is None:
            raise FidWeightsError("FID needs the Inception weights: a local file, or 'download' when online")
        path = download_inception_weights() if weights == DOWNLOAD else weights
        self.weights_path = path
        self.weights_sha256 = verify_inception_weights(path, expected_sha256)
        cls = _inception_class()
        try:
            # The file passed the hash and the weights_only check above; the library loads it.
            self.model = cls("inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=path)
        except RuntimeError as exc:  # load_state_dict(strict=True): wrong or missing keys/shapes
            raise FidWeightsError(f"{path}: not an InceptionV3 FID state dict ({exc})") from exc
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.dim = FEATURE_DIM

    def describe(self) -> dict[str, Any]:
        return {"fid_feature_extractor": f"torch-fidelity FeatureExtractorInceptionV3 ({INCEPTION_WEIGHTS_NAME})",
                "fid_weights": self.weights_path, "fid_weights_sha256": self.weights_sha256,
                "fid_feature_dim": self.dim, "fid_resize": RESIZE_PATH}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        (features,) = self.model(images.to(self.device))
        return features.to(torch.float64).cpu()

    def accumulate(self, batches: Iterable[torch.Tensor], stats: FeatureStats | None = None) -> FeatureStats:
        stats = stats if stats is not None else FeatureStats(self.dim)
        for batch in batches:
            stats.update(self(batch))
        return stats


# --------------------------------------------------------------------------------------------
# Reference statistics cache
# --------------------------------------------------------------------------------------------

def reference_cache_key(content: dict[str, Any]) -> str:
    """sha256 of what determines the reference statistics (eval-set digest, keys, N, weights, resize)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def cached_reference_stats(cache_dir: str, content: dict[str, Any], compute: Any) -> tuple[FeatureStats, str, bool]:
    """Load the reference stats cached under their content hash, or `compute()` and store them.

    Returns (stats, cache path, whether it was a cache hit).
    """
    key = reference_cache_key(content)
    path = storage.join(cache_dir, f"fid_ref_{key[:24]}.npz")
    if storage.exists(path):
        return FeatureStats.load(path), path, True
    stats = compute()
    stats.save(path)
    storage.atomic_write_json(storage.join(cache_dir, f"fid_ref_{key[:24]}.json"), {**content, "n": stats.n})
    return stats, path, False
