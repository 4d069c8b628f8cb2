"""What plain generation (pipelines/generate.py) and super-resolution (pipelines/upscale.py) share: the
result they return, the output directory's settings check, and the Ray Data actor pool of samplers.

generate.py dispatches `--upscaler` runs to upscale.py; neither upscale.py nor this module imports
generate.py, so the stages' imports point one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from latentforge import manifest as mf
from latentforge import storage
from latentforge.config import ConfigError, config_to_dict
from latentforge.generation.config import GenerateConfig


@dataclass
class GenerateResult:
    out: str
    total: int
    generated: int
    skipped: int
    seconds: float
    manifest_sha256: str
    mlflow_run_id: str | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def open_output(out: str) -> None:
    """The output dir, made if missing, without the temp files an interrupted run left."""
    storage.makedirs(out)
    storage.remove_stale_temps(out)


def require_same_settings(out: str, settings: dict[str, Any], keys: Any) -> None:
    """A rerun into `out` must keep the `keys` of `settings` its manifest recorded: else exit 2."""
    if not storage.exists(mf.manifest_uri(out)):
        return
    previous = mf.read_manifest(out, stage="generate")
    try:
        mf.require_same(previous.extra.get("settings", {}), settings, keys, out)
    except mf.ManifestError as exc:  # a usage error: exit 2 like any bad option
        raise ConfigError(str(exc)) from exc


def _actor_config(config: GenerateConfig, gpus: float) -> dict[str, Any]:
    """The options each actor rebuilds its config from; `auto` is the CPU on an actor given no GPU."""
    actor_config = config_to_dict(config)
    if gpus == 0 and actor_config["device"] == "auto":
        actor_config["device"] = "cpu"
    return actor_config


def run_actor_pool(config: GenerateConfig, items: list[dict[str, Any]], actor: type,
                   actor_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`items` (one request each) through a Ray Data pool of `actor(config=..., **actor_kwargs)`, each call
    a batch that the actor writes to `config.out`; yields the index rows it returns as they finish."""
    import json

    import ray
    import ray.data

    from pipelines.runtime import init_ray

    init_ray(log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    gpus = config.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    blocks = max(1, min(len(items), config.concurrency * 4))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(actor, batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                        num_cpus=config.num_cpus_per_actor, num_gpus=gpus, batch_format="numpy",
                        fn_constructor_kwargs={"config": _actor_config(config, gpus), **actor_kwargs})
    for row in ds.iter_rows():
        yield json.loads(row["row"])
