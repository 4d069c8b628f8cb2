"""Precompute as a Ray Data graph: ingest shards -> VAE latents + CLIP text embeddings.

    shard list --(CPU tasks: read tar, decode, resize/crop; one task per shard, streamed in
    blocks of read_batch_size rows)--> encoder actor pool (num_gpus per actor on GPU clusters,
    CPU actors otherwise; `concurrency` actors) --> driver-side writer (one temp tar per input
    shard, renamed when the shard's trailer row and all its rows have arrived)

Every input row becomes one output row (encoded, or marked with a skip reason), and each
shard's reader ends with a trailer row carrying the number of rows it read and why its input tar
could not be read completely, if so, so the writer knows when a shard is complete without
buffering it, and publishes only shards read completely (docs/precompute.md "Input errors").
Memory stays bounded by Ray Data's streaming backpressure; the driver holds only open tar
handles. After each finished shard the manifest is rewritten, so a killed driver loses at most
the shards in flight; a rerun skips finished shards and produces byte-identical tars. Finally the
fidelity gate re-encodes a sample in fp32. With `--resolutions` each row carries one image / meta /
latent column per size and each size's dataset has its own writers and manifest
(`latentforge.precompute.resolutions`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np

from latentforge import storage
from latentforge.config import ConfigError, config_to_dict
from latentforge.manifest import manifest_digest
from latentforge.precompute.config import EncoderActors, PrecomputeConfig, column_name
from latentforge.precompute.preprocess import IngestSample, preprocess_resolutions
from latentforge.precompute.resolutions import Target, plan_targets, write_parent
from latentforge.precompute.shard_input import ShardRead, read_shard
from latentforge.precompute.stage import check_models, write_empty_caption
from latentforge.precompute.writer import PAD, TRAILER, ShardSink
from latentforge.reporting import format_rate, progress_bar, summary_table
from latentforge.tracking import StageRun, default_run_name

log = logging.getLogger("latentforge.precompute")

@dataclasses.dataclass
class PrecomputeResult:
    """A finished run: `jobs/_bootstrap.run_job` prints `summary` and exits 0."""

    output: str
    summary: str = ""


# --- Graph stages (run on Ray workers) ------------------------------------------------------------

def read_shards(batch: dict[str, np.ndarray], *, input_dir: str, preprocess: dict[str, Any], rows_per_block: int,
                batch_size: int, retries: int, backoff_s: float) -> Iterator[dict[str, np.ndarray]]:
    """For each shard in the batch: stream its samples, preprocess, yield blocks, then a trailer row.

    Blocks hold a multiple of `batch_size` rows and each shard's last block is padded to one, so
    every encoder batch is rows [k*B, (k+1)*B) of one shard, whatever ran before it or failed.
    Batch composition changes float results in the last bits, so this is what makes a resumed
    or retried run byte-identical to an uninterrupted one. The trailer carries the rows read and,
    in its meta, why the input tar could not be read completely ("" when it was). `preprocess`
    names one `resolution`, or `resolutions` (each image decoded once, one image/meta column per size).
    """
    options = {k: v for k, v in preprocess.items() if k not in ("resolution", "resolutions")}
    multi = bool(preprocess.get("resolutions"))
    blanks = {r: np.zeros((r, r, 3), dtype=np.uint8) for r in preprocess.get("resolutions") or [preprocess["resolution"]]}
    rows_per_block = batch_size * max(1, rows_per_block // batch_size)
    for shard, sha256 in zip(batch["shard"], batch["sha256"]):
        shard = str(shard)
        read = ShardRead(storage.join(input_dir, f"{shard}.tar"), str(sha256))
        rows: list[tuple] = []
        count = 0
        for row in _sample_rows(shard, read_shard(read, retries, backoff_s), options, blanks):
            rows.append(row)
            count += 1
            if len(rows) >= rows_per_block:
                yield _rows_to_batch(rows, multi)
                rows = []
        if read.error:
            logging.getLogger(__name__).warning("shard %s: input incomplete: %s", shard, read.error)
        trailer = json.dumps({"error": read.error})
        rows.append((shard, f"{shard}_end", TRAILER, "", dict.fromkeys(blanks, trailer), blanks, count))
        while len(rows) % batch_size:
            rows.append((shard, f"{shard}_pad", PAD, "", dict.fromkeys(blanks, "{}"), blanks, -1))
        yield _rows_to_batch(rows, multi)


def _sample_rows(shard: str, samples: Iterator[IngestSample], options: dict[str, Any],
                 blanks: dict[int, np.ndarray]) -> Iterator[tuple]:
    seen: set[str] = set()
    for sample in samples:
        if sample.key in seen:  # a duplicated key in a tar: keep the first
            continue
        seen.add(sample.key)
        status, images, records = preprocess_resolutions(sample, tuple(blanks), **options)
        metas = {r: json.dumps(record, ensure_ascii=False) for r, record in records.items()}
        yield (shard, sample.key, status, sample.caption, metas, {r: images.get(r, blanks[r]) for r in blanks}, -1)


def _rows_to_batch(rows: list[tuple], multi: bool) -> dict[str, np.ndarray]:
    shard, key, status, caption, metas, images, count = zip(*rows)
    batch = {"shard": np.array(shard), "key": np.array(key), "status": np.array(status),
             "caption": np.array(caption, dtype=object), "count": np.array(count, dtype=np.int64)}
    for r in metas[0]:
        batch[column_name("meta", r, multi)] = np.array([m[r] for m in metas], dtype=object)
        batch[column_name("image", r, multi)] = np.stack([i[r] for i in images])
    return batch


class EncoderActor:
    """Holds the VAE and text encoder on this actor's device; encodes the `ok` rows of each batch."""

    def __init__(self, config: PrecomputeConfig, num_threads: int = 0) -> None:
        import torch

        from latentforge.precompute.encode import PrecomputeEncoder

        if num_threads and not torch.cuda.is_available():
            torch.set_num_threads(num_threads)
        self.encoder = PrecomputeEncoder(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.encoder.encode_batch(batch)


def _probe(config: PrecomputeConfig) -> dict[str, Any]:
    """Load the encoders once: their manifest records, weight hashes, latent shape per size, empty caption."""
    import torch

    from latentforge.models.vae import weight_files
    from latentforge.precompute.encode import PrecomputeEncoder

    encoder = PrecomputeEncoder(config, device="cpu", compute_dtype=torch.float32)
    text_weights = config.text_encoder_weights or ""
    weights = {"vae": weight_files(config.vae) if config.vae else {},
               "text_encoder": ({"file": storage.sha256_file(text_weights)} if text_weights and storage.exists(text_weights)
                                else {"tag": text_weights})}
    empty_text, empty_pooled, length = encoder.empty_caption()
    return {"models": {**encoder.describe(), "weights": weights},
            "latent_shapes": {r: list(encoder.latent_shape_at(r)) for r in config.sizes},
            "empty": (empty_text, empty_pooled, length)}


def _fidelity(config: PrecomputeConfig, shard_names: list[str]) -> dict[str, Any]:
    from latentforge.precompute.fidelity import check_fidelity

    return check_fidelity(config, shard_names)


def _one_process(fn: Any, gpus: float, *args: Any) -> Any:
    """Run `fn` in ONE process: a 1-GPU Ray task on GPU clusters, else right here in the driver."""
    import ray

    if gpus >= 1:
        return ray.get(ray.remote(num_gpus=1, num_cpus=1, max_retries=1)(fn).remote(*args))
    return fn(*args)


# --- Driver ---------------------------------------------------------------------------------------

def run(config: PrecomputeConfig) -> PrecomputeResult:
    """Run the stage; exit codes come from `jobs/_bootstrap.run_job`.

    Raises ConfigError / ManifestError (bad config or input: exit 2), StageFailure (shards not
    published, fidelity gate: exit 1); SIGINT/SIGTERM arrive as KeyboardInterrupt, finished
    shards are kept.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        targets = plan_targets(config)
    except FileNotFoundError as exc:  # a missing input is a usage error, reported like one
        raise ConfigError(str(exc)) from exc
    run_name = config.run_name or default_run_name("precompute", config.output)
    with StageRun("precompute", run_name=run_name, enabled=config.mlflow) as tracking:
        tracking.log_params(config_to_dict(config))
        tracking.log_manifest(config.input, targets[0].plan.input_digest, "input")
        return _run(config, targets, tracking)


class StageFailure(RuntimeError):
    """The stage ran but its result is not acceptable (fidelity breach, incomplete shards)."""


def _cluster(config: PrecomputeConfig) -> tuple[str, float, EncoderActors]:
    """Ray up; where the job runs, the cluster's GPUs and the encoder pool sized for them."""
    import ray

    from pipelines.runtime import init_ray

    where = init_ray()
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    # The CPU policy sizes the pool from the CPUs free now, not the cluster's total: a driver started
    # by `ray job submit --entrypoint-num-cpus 1` (infra/submit.sh) already holds one, and actors
    # sized from the total left the shard readers no whole CPU (the job waited forever).
    free_cpus = float(ray.available_resources().get("CPU", 0))
    actors = config.encoder_actors(free_cpus, gpus)
    log.info("precompute: encoder actors %s (cluster: %g CPU, %g free; %g GPU)", actors.describe(),
             resources.get("CPU", 0), free_cpus, gpus)
    return where, gpus, actors


def _fail_on_breach(summary: str, targets: list[Target]) -> None:
    """StageFailure (after the numbers behind it) when a dataset's latents breach the fidelity gate."""
    breach = next((t for t in targets if not t.fidelity.get("passed", True)), None)
    if breach is not None:
        print(summary, flush=True)
        fidelity = breach.fidelity
        raise StageFailure(f"fidelity gate{_where(breach, targets)}: max relative error {fidelity['max_rel_error']:.3e} "
                           f"> tolerance {fidelity['tolerance']:.3e} (worst: {fidelity.get('worst_key')})")


def _run(config: PrecomputeConfig, targets: list[Target], tracking: StageRun) -> PrecomputeResult:
    where, gpus, actors = _cluster(config)
    started = time.monotonic()
    probe = _one_process(_probe, gpus, config)
    for target in targets:
        _start(target, probe, actors)
    publish_all = _publisher(config, targets)
    publish_all()
    log.info("precompute: %s (%s)", "; ".join(f"{t.label}: {len(t.plan.done)} shard(s) done, {len(t.plan.pending)} "
                                              "to encode" for t in targets), where)
    session_counts: Counter = Counter()
    failed: dict[str, str] = {}
    if any(t.plan.pending for t in targets):
        session_counts = _encode_targets(config, targets, actors, failed)
    _require_all_published(config, targets, failed, publish_all)
    for target in targets:
        target.fidelity = _one_process(_fidelity, gpus, target.config, sorted(target.records))
    publish_all()
    elapsed = time.monotonic() - started
    _log_run(tracking, targets, session_counts, elapsed)
    summary = summary_table("precompute summary", _summary_rows(config, targets, session_counts, elapsed, actors, where))
    _fail_on_breach(summary, targets)
    return PrecomputeResult(config.output, summary)


def _start(target: Target, probe: dict[str, Any], actors: EncoderActors) -> None:
    """Prepare one dataset's directory: stale temps gone, models checked against a rerun's, empty caption."""
    out = target.config.output
    storage.makedirs(out)
    removed = storage.remove_stale_temps(out)
    if removed:
        log.info("removed %d temp file(s) left by a killed run in %s", removed, out)
    check_models(target.plan.previous, probe["models"], out)
    target.models, target.latent_shape = probe["models"], probe["latent_shapes"][target.config.resolution]
    target.empty = write_empty_caption(out, *probe["empty"])
    target.encoder_actors = dataclasses.asdict(actors)


def _publisher(config: PrecomputeConfig, targets: list[Target]) -> Callable[[], None]:
    """Rewrite every dataset's manifest, then (with --resolutions) the parent's that lists them."""
    def publish_all() -> None:
        for target in targets:
            target.publish()
        if config.resolutions:
            write_parent(config, targets)
    return publish_all


def _where(target: Target, targets: list[Target]) -> str:
    return f" ({target.label})" if len(targets) > 1 else ""


def _log_run(tracking: StageRun, targets: list[Target], session_counts: Counter, elapsed: float) -> None:
    counts = targets[0].manifest().counts  # the same samples in every size
    tracking.log_metrics({**{f"count.{k}": v for k, v in counts.items()},
                          "session.samples": session_counts["rows"],
                          "session.samples_per_s": session_counts["rows"] / elapsed if elapsed else 0.0,
                          "fidelity.max_rel_error": max(t.fidelity.get("max_rel_error", 0.0) for t in targets)})
    for target in targets:
        name = target.label if len(targets) > 1 else None
        tracking.log_manifest(target.config.output, manifest_digest(target.config.output), "output", name)


def _summary_rows(config: PrecomputeConfig, targets: list[Target], session_counts: Counter, elapsed: float,
                  actors: EncoderActors, where: str) -> list[tuple[str, Any]]:
    counts = targets[0].manifest().counts
    rows: list[tuple[str, Any]] = [("output", config.output)]
    rows += [(f"shards{_where(t, targets)}", f"{len(t.records)} ({len(t.plan.done)} kept from an earlier run)")
             for t in targets]
    rows += [("samples read", counts.get("samples", 0)), ("samples stored", counts.get("ok", 0))]
    rows += [(f"skipped: {k[len('skipped_'):]}", v) for k, v in sorted(counts.items()) if k.startswith("skipped_")]
    if counts.get("partial_shards"):
        rows.append(("PARTIAL shards", f"{counts['partial_shards']} published incomplete "
                                       f"(--allow-partial-shards), {counts['lost_samples']} samples lost"))
    rows.append(("this run", f"{session_counts['rows']:,} samples in {elapsed:,.1f} s, "
                             f"{format_rate(session_counts['rows'], elapsed, 'samples')}"))
    for t in targets:
        pixels = ", pixels" if t.config.store_pixels else ""
        rows += [(f"latent{_where(t, targets)}", f"{config.latent} {t.latent_shape} {config.dtype}{pixels}"),
                 (f"fidelity{_where(t, targets)}", f"max rel error {t.fidelity.get('max_rel_error', 0.0):.2e} "
                  f"(tolerance {t.fidelity.get('tolerance')}, {t.fidelity.get('samples', 0)} samples)")]
    return rows + [("encoder actors", actors.describe()), ("ran on", where), ("library", _library_path())]


def _require_all_published(config: PrecomputeConfig, targets: list[Target], failed: dict[str, str],
                           publish_all: Callable[[], None]) -> None:
    """Every planned shard is in every dataset's manifest, or the stage fails naming each missing one and why."""
    planned = [s.name for s in targets[0].plan.input_manifest.shards[: config.max_shards or None]]
    missing = [name for name in planned if any(name not in t.records for t in targets)]
    if not missing:
        return
    publish_all()
    for name in missing:
        print(f"precompute: shard {name} not published: {failed.get(name, 'did not finish')}", file=sys.stderr)
    raise StageFailure(f"{len(missing)} shard(s) not published ({', '.join(missing[:5])}); the other shards are "
                       "kept: repair the input and rerun to redo exactly these (or --allow-partial-shards)")


def read_task_memory(config: PrecomputeConfig) -> int:
    """Bytes a reader worker holds: the interpreter with torch/PIL loaded (~400 MiB measured) plus a
    few blocks of decoded uint8 images."""
    return (512 << 20) + 4 * config.read_batch_size * sum(r ** 2 for r in config.sizes) * 3


def _library_path() -> str:
    import latentforge

    return str(latentforge.__file__).rsplit("/", 1)[0]


def build_dataset(config: PrecomputeConfig, shards: list[Any], actors: EncoderActors) -> Any:
    """The Ray Data graph for the input shard records `shards` (exposed for the benchmark)."""
    import ray

    items = [{"shard": s.name, "sha256": s.sha256 or ""} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ctx = ds.context
    ctx.execution_options.preserve_order = True  # deterministic tars: rows keep input order
    ctx.enable_progress_bars = False
    preprocess = {"resolution": config.resolution, "resize_filter": config.resize_filter, "crop": config.crop,
                  "seed": config.seed, "keep_empty_captions": config.keep_empty_captions,
                  "conditions": tuple(config.condition_columns), "resolutions": tuple(config.resolutions)}
    ds = ds.map_batches(
        read_shards, batch_size=1, batch_format="numpy", num_cpus=1,
        # A memory reservation for the decode buffers. Remote args that differ from the actors'
        # also keep Ray Data from fusing decode into the encoder actors, so CPU decode/preprocess
        # overlaps with encoding instead of running inside the actor.
        memory=read_task_memory(config),
        fn_kwargs={"input_dir": config.input, "preprocess": preprocess, "rows_per_block": config.read_batch_size,
                   "batch_size": config.batch_size, "retries": config.read_retries,
                   "backoff_s": config.read_backoff_s},
    )
    return ds.map_batches(
        EncoderActor, batch_size=config.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors.count),
        fn_constructor_kwargs={"config": config, "num_threads": actors.threads},
        num_cpus=actors.num_cpus, **({"num_gpus": actors.num_gpus} if actors.num_gpus else {}),
    )


def encode_shards(config: PrecomputeConfig, plan: Any, records: dict, publish: Any, actors: EncoderActors,
                  on_rows: Any = None, failed: dict[str, str] | None = None) -> Counter:
    """Stream the graph's rows into per-shard writers; `on_rows(n)` is called per batch (benchmarks).

    Shards whose input could not be read completely land in `failed` (name -> reason), unpublished
    unless `allow_partial_shards`.
    """
    sink = ShardSink(config, {s.name: s for s in plan.pending}, records, publish,
                     failed if failed is not None else {})
    return _stream(config, plan.pending, [(lambda row: row, sink)], actors, on_rows)


def _encode_targets(config: PrecomputeConfig, targets: list[Target], actors: EncoderActors,
                    failed: dict[str, str]) -> Counter:
    """ONE pass over the shards any dataset still needs; each dataset's sink takes the rows of its own
    pending shards, seen through its resolution's columns."""
    if len(targets) == 1:  # a plain run: rows already carry image / meta / latent
        target = targets[0]
        return encode_shards(config, target.plan, target.records, target.publish, actors, failed=failed)
    needed = {s.name for t in targets for s in t.plan.pending}
    shards = [s for s in targets[0].plan.input_manifest.shards if s.name in needed]
    sinks = [(t.view, ShardSink(t.config, {s.name: s for s in t.plan.pending}, t.records, t.publish, failed))
             for t in targets]
    return _stream(config, shards, sinks, actors)


def _stream(config: PrecomputeConfig, shards: list[Any], sinks: list[tuple[Callable, ShardSink]],
            actors: EncoderActors, on_rows: Any = None) -> Counter:
    """Run the graph over `shards`, handing each row to every (view, sink) that wants its shard; counts rows."""
    ds = build_dataset(config, shards, actors)
    counts: Counter = Counter()
    bar = progress_bar(sum(s.samples for s in shards), "precompute", "img", config.progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            if on_rows is not None:
                on_rows(len(batch["key"]))
            for i in range(len(batch["key"])):
                row = {name: batch[name][i] for name in batch}
                added = max((sink.add(view(row)) for view, sink in sinks if sink.wants(str(row["shard"]))), default=0)
                counts["rows"] += added
                bar.update(added)
    finally:
        bar.close()
        for _, sink in sinks:
            sink.abort()
    return counts
