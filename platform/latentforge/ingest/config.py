"""`IngestConfig`: every knob of the ingest stage, with a docstring per field."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, Optional

from latentforge.config import ConfigError
from latentforge.formats import MAX_SAMPLES_PER_SHARD
from latentforge.tracking import TrackingOptions

#: Every status a ledger row can have; `ok` means a sample was written to the tar.
STATUSES = (
    "ok",
    "http_4xx",          # 4xx answer (404/410/403/429 after retries ...); never retried except 429
    "http_5xx",          # 5xx answer after the retries ran out
    "http_other",        # 1xx/3xx without Location and other odd answers
    "timeout",           # the total per-request deadline passed (connect, headers or body)
    "dns",               # the host name did not resolve
    "connection",        # refused / reset / TLS failure
    "too_many_redirects",
    "too_large",         # Content-Length or the streamed body passed max_bytes
    "not_image",         # empty, HTML, SVG, or a format outside the allow-list
    "decode_error",      # truncated or corrupt image data
    "bomb",              # header dimensions above max_image_pixels (refused before decoding)
    "filtered_size",     # smaller than min_image_size or wider than max_aspect_ratio
    "opt_out",           # X-Robots-Tag noai / noimageai
    "ssrf_blocked",      # scheme or address not allowed (checked on every redirect hop)
    "hash_mismatch",     # the bytes do not match the input's hash column
    "bad_url",           # empty or unparsable URL
    "internal_error",    # an unexpected exception while handling the row (a bug; see the error column)
)
FAILURE_REASONS = STATUSES[1:]
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


@dataclass
class IngestConfig(TrackingOptions):
    """Download URL+caption lists into WebDataset shards (one shard per Ray task, resumable)."""

    input: str = ""
    """Input: a parquet/csv/tsv/jsonl file (optionally .gz), a directory or a glob; local or fsspec URI."""
    output: str = ""
    """Output directory (local or fsspec URI): NNNNN.tar/.parquet/_stats.json and manifest.json."""
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    """Input format; auto picks it from each file's extension (.gz stripped first)."""
    url_col: str = "url"
    """Column holding the image URL (LAION: URL)."""
    caption_col: Optional[str] = "caption"
    """Column holding the caption (LAION: TEXT); none/empty for inputs without captions."""
    hash_col: Optional[str] = None
    """Optional column with the expected hex digest of the image bytes; a mismatch is hash_mismatch."""
    hash_type: Literal["sha256", "md5", "sha1"] = "sha256"
    """Digest used with hash_col."""
    samples_per_shard: int = 1000
    """Input rows per shard: row i goes to shard i // samples_per_shard. Fixed for an output directory."""

    image_size: int = 256
    """Target size in pixels for the resize mode."""
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    """img2dataset resize mode: no, border, keep_ratio, keep_ratio_largest, center_crop."""
    resize_only_if_bigger: bool = False
    """Only downscale; smaller images keep their size."""
    min_image_size: int = 0
    """Refuse images whose smaller side is below this (status filtered_size)."""
    max_aspect_ratio: Optional[float] = None
    """Refuse images whose long/short side ratio is above this (status filtered_size); none = no limit."""
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    """Format the samples are re-encoded to."""
    encode_quality: int = 95
    """jpg/webp quality (0-100), or png compression level (0-9)."""
    allowed_formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
    """Image formats accepted (Pillow names); anything else is not_image (SVG/HTML never decode)."""
    max_image_pixels: int = 89_478_485
    """Decompression-bomb limit: width*height from the header above this is refused before decoding."""

    timeout_s: float = 20.0
    """Wall-clock deadline per request: all attempts, backoff waits, redirect hops, DNS, connect, headers, body."""
    max_bytes: int = 20 * 1024 * 1024
    """Largest body accepted; checked on Content-Length and while streaming (status too_large)."""
    retries: int = 2
    """Extra attempts after a connection error, 429 or 5xx while the deadline allows; other 4xx never."""
    backoff_s: float = 0.5
    """Base of the exponential backoff (base * 2**attempt, with jitter)."""
    backoff_max_s: float = 20.0
    """Cap of one backoff sleep."""
    max_retry_after_s: float = 60.0
    """Longest Retry-After honoured; a server asking for longer is not retried."""
    max_redirects: int = 5
    """Redirect hops followed per request; every hop is re-checked by the address rules."""
    threads_per_shard: int = 32
    """Concurrent downloads inside one shard task."""
    max_per_host: int = 8
    """Concurrent requests to one host from one worker process."""
    reuse_connections: bool = True
    """Keep a host's connections open between its images (HTTP keep-alive); false = one connection per image."""
    user_agent_token: str = "latentforge"
    """Token in the User-Agent (and the name X-Robots-Tag directives may address)."""
    honor_opt_out: bool = True
    """Honour X-Robots-Tag opt-out directives (status opt_out)."""
    opt_out_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    """X-Robots-Tag directives that count as an opt-out."""
    allow_private_network: bool = False
    """Allow loopback/private/link-local/reserved addresses (tests and the demo serve from 127.0.0.1)."""
    allow_networks: list[str] = field(default_factory=list)
    """CIDRs allowed even though private (e.g. an internal mirror), without lifting the whole rule."""

    retry_reasons: list[str] = field(default_factory=list)
    """Re-download only finished rows whose status is one of these (e.g. timeout,http_5xx,dns) into new shards."""
    num_cpus: Optional[int] = None
    """CPUs of the embedded local Ray (ignored when RAY_ADDRESS names a cluster); none = all."""
    cpus_per_task: float = 1.0
    """Ray CPUs reserved per shard task."""
    max_concurrent_shards: Optional[int] = None
    """Upper bound on shard tasks running at once; none = as many as the CPUs allow."""
    verify_finished: bool = False
    """On resume, re-hash every finished shard's files; default: trust a tar whose size matches its manifest
    record (a stat, no bytes read). A shard whose files are missing or do not match is redone."""
    progress: bool = True
    """Show a progress bar on stderr."""
    run_name: Optional[str] = None
    """MLflow run name; default ingest-<output dir name>."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise ConfigError(f"samples_per_shard must be in 1..{MAX_SAMPLES_PER_SHARD}, got {self.samples_per_shard}")
        if not self.url_col:
            raise ConfigError("url_col must name a column")
        if self.caption_col is not None and self.caption_col.strip().lower() in ("", "none", "null"):
            self.caption_col = None
        self._check_images()
        for name in ("timeout_s", "max_bytes", "threads_per_shard", "max_per_host", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("retries", "backoff_s", "backoff_max_s", "max_retry_after_s", "max_redirects", "min_image_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        self._check_download_policy()

    def _check_images(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {RESIZE_MODES}")
        if self.image_size <= 0:
            raise ConfigError("image_size must be positive")
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ConfigError("for png, encode_quality is the compression level 0..9")
        if self.encode_format != "png" and not 0 <= self.encode_quality <= 100:
            raise ConfigError("encode_quality must be in 0..100")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ConfigError("max_aspect_ratio must be >= 1")
        self.allowed_formats = [f.upper() for f in self.allowed_formats]

    def _check_download_policy(self) -> None:
        self.opt_out_directives = [d.strip().lower() for d in self.opt_out_directives]
        unknown = sorted(set(self.retry_reasons) - set(FAILURE_REASONS))
        if unknown:
            raise ConfigError(f"retry_reasons: unknown reason(s) {unknown}; known: {list(FAILURE_REASONS)}")
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"allow_networks: {cidr!r} is not a CIDR") from exc

    def missing_options(self) -> list[str]:
        """input and output are required to run (not to print the config)."""
        given = {"--input (a file, directory, glob or URI of URL lists)": self.input,
                 "--output (the shard directory)": self.output}
        return [flag for flag, value in given.items() if not value]


#: Settings that must not change between runs writing into one output directory.
SAME_OUTPUT_KEYS = ("samples_per_shard", "url_col", "caption_col", "hash_col", "image_size", "resize_mode",
                    "encode_format")
