"""Restore for inference: verified checkpoint -> SavedModel in ``<export>/<version>/``.

Steps: read the catalog and pick a checkpoint (latest, a step, or best by a
metric); verify it against its manifest (falling back to the newest one that
verifies unless a step was asked for); build the predict-mode graph from the
run's recorded config; check every variable the outputs read is in the
checkpoint; restore with optional scope maps (a partitioned variable from its
logical tensor, into whatever partitioning the predict graph has: see
:mod:`.restore_plan`); export a SavedModel with a
``serving_default`` signature, written under a tmp name and renamed into place so
a server watching the directory never loads half a model.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from distributed.checkpoint import layout
from distributed.checkpoint.catalog import Catalog, CatalogEntry
from distributed.checkpoint.metric_goal import MetricGoal
from distributed.checkpoint.verify import read_committed_manifest, read_verified
from distributed.serving.restore_plan import block, restore_plan
from distributed.storage.runstore import RunStore
from distributed.errors import (CheckpointCorruptError, CheckpointNotFoundError,
                                ConfigError, ManifestError, StorageError)

EXPORTS_DIR = "exports"
EXPORT_SCHEMA_VERSION = "1"
EXPORT_SCHEMA = pa.schema([
    pa.field("run", pa.string(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("tier", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("export_dir", pa.string(), nullable=False),
    pa.field("exported_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("seconds", pa.float64(), nullable=False),
], metadata={"schema_version": EXPORT_SCHEMA_VERSION,
             "format": "distributed-tf-ray/exports"})


@dataclasses.dataclass(frozen=True)
class ScopeMap:
    """Checkpoint names starting with ``ckpt_prefix`` restore into graph
    variables starting with ``graph_prefix``."""

    ckpt_prefix: str
    graph_prefix: str

    def to_ckpt(self, graph_name: str) -> str | None:
        if graph_name.startswith(self.graph_prefix):
            return self.ckpt_prefix + graph_name[len(self.graph_prefix):]
        return None


def parse_scope_maps(specs: Sequence[str]) -> list[ScopeMap]:
    """Parses ``CKPT_PREFIX=GRAPH_PREFIX`` strings (either side may be empty,
    not both)."""
    maps = []
    for spec in specs or ():
        if spec.count("=") != 1 or spec == "=":
            raise ConfigError(f"--map: {spec!r} is not CKPT_PREFIX=GRAPH_PREFIX "
                              "(e.g. --map tower/=serving/tower/)")
        ckpt, graph = spec.split("=")
        maps.append(ScopeMap(ckpt, graph))
    return maps


def _ckpt_name(graph_name: str, maps: Sequence[ScopeMap]) -> str:
    for m in sorted(maps, key=lambda m: -len(m.graph_prefix)):  # longest first
        mapped = m.to_ckpt(graph_name)
        if mapped is not None:
            return mapped
    return graph_name


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a training run recorded about itself (``run_config.json``)."""

    config: Any  # TrainConfig
    input_spec: Any  # InputSpec


def load_run_record(store: RunStore) -> RunRecord:
    """Reads the config and input spec the run recorded at its start."""
    from distributed import config as config_lib
    from distributed.checkpoint.layout import RUN_CONFIG_FILE
    from distributed.inputs.spec import InputSpec
    path = os.path.join(store.layout.root, RUN_CONFIG_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"run {store.layout.run!r} has no {RUN_CONFIG_FILE} under "
            f"{store.layout.storage}, so its model cannot be rebuilt; check --storage "
            "and --run") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable run record ({e})") from None
    return RunRecord(config_lib.from_dict(record["config"]),
                     InputSpec.from_json(record["input_spec"]))


def candidate_checkpoints(catalog: Catalog, step: int | None = None,
                          best: str | None = None, tier: str = "serving"
                          ) -> list[CatalogEntry]:
    """Committed checkpoints to try, best first: the given step only, or all by
    a metric (``"metric[:min|max]"``), or all newest first.

    Raises:
        CheckpointNotFoundError: No such step, an empty catalog, or no
            checkpoint that records the metric.
        ConfigError: A malformed ``best``.
    """
    if step is not None:
        return [catalog.get(step, tier)]
    if best:
        try:
            goal = MetricGoal.parse(best)
        except ConfigError as e:
            raise ConfigError(f"--best: {e}") from None
    entries = catalog.entries(tier)
    if not entries:
        raise CheckpointNotFoundError(
            f"run {catalog.run!r} has no committed {tier} checkpoint yet; train the "
            f"run further or wait for its first {tier} checkpoint "
            f"(checkpoint.{tier}_every), or use --watch to export it when it lands")
    if not best:
        return sorted(entries, key=lambda e: -e.step)
    scored = goal.ranked(entries)
    if not scored:
        recorded = sorted({m for e in entries for m in e.metrics})
        raise CheckpointNotFoundError(
            f"--best: no {tier} checkpoint of run {catalog.run!r} records metric "
            f"{goal.metric!r}; they record {', '.join(recorded) or 'no metric'}")
    return scored


def export_first_good(store: RunStore, export_root: str,
                      candidates: Sequence[CatalogEntry], record: RunRecord,
                      maps: Sequence[ScopeMap] = (), model: str | None = None,
                      fallback: bool = True,
                      echo: Callable[[str], None] = print) -> ExportResult:
    """Exports the first candidate that verifies.

    A corrupt candidate is an error when ``fallback`` is off (an explicit
    step); otherwise it is reported and the next candidate is tried.
    """
    for i, entry in enumerate(candidates):
        try:
            result = export_checkpoint(store, export_root, entry, record, maps, model)
        except (CheckpointCorruptError, ManifestError) as e:
            if not fallback:
                raise
            echo(f"WARNING: {entry.tier} checkpoint at step {entry.step} fails "
                 f"verification ({e}); trying the next one")
            continue
        if i:
            echo(f"using {entry.tier} checkpoint at step {entry.step} instead")
        return result
    raise CheckpointCorruptError(
        f"no checkpoint of run {store.layout.run!r} verifies ({len(candidates)} tried)")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """One exported version."""

    version: int
    step: int
    export_dir: str
    seconds: dict
    # serving_default: {"inputs"|"outputs": {name: "dtype [d0, d1, ...]"}}
    signature: dict = dataclasses.field(default_factory=dict)

    def describe_signature(self) -> list[str]:
        """The serving signature, a line per side, for the job's output."""
        return [f"  {side}: " + ", ".join(f"{name} {kind}" for name, kind in
                                       sorted(self.signature.get(side, {}).items()))
                for side in ("inputs", "outputs")]


def _check_export_root(export_root: str) -> None:
    try:
        os.makedirs(export_root, exist_ok=True)
        probe = os.path.join(export_root, f".probe{layout.TMP_MARKER}x")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise StorageError(f"--export: {export_root!r} is not writable "
                           f"({e.strerror or e}); pass a writable directory") from None


def _read_committed(run_layout: layout.RunLayout, entry: CatalogEntry):
    """Re-reads ``entry``'s row file and manifest down the checksum chain; a
    checkpoint deleted meanwhile becomes an error the fallback moves past."""
    try:
        return read_committed_manifest(run_layout, entry.step, entry.tier)
    except CheckpointNotFoundError as e:
        raise ManifestError(f"{entry.tier} checkpoint at step {entry.step} is no "
                            f"longer committed (deleted meanwhile?): {e}") from None


def export_checkpoint(store: RunStore, export_root: str,
                      entry: CatalogEntry, record: RunRecord,
                      maps: Sequence[ScopeMap] = (), model: str | None = None,
                      clock: Callable[[], float] = time.time) -> ExportResult:
    """Builds the predict graph, restores ``entry`` into it and exports it,
    holding a reader lease on the checkpoint so retention cannot delete it
    meanwhile (see :mod:`distributed.checkpoint.lease`); an object store
    run's checkpoint is fetched into the reader's cache first.

    Raises:
        CheckpointNotFoundError: Variables the outputs read are missing from the
            checkpoint (named, with the likely cause).
        ConfigError: The predict graph's variable shapes differ from the
            checkpoint's.
        StorageError: The export directory cannot be written.
    """
    with store.reading(entry.tier, entry.step):
        try:
            store.fetch(entry.tier, entry.step)
        except CheckpointNotFoundError as e:
            raise ManifestError(f"{entry.tier} checkpoint at step {entry.step} is "
                                f"no longer committed (deleted meanwhile?): {e}") from None
        return _export(store.layout, export_root, entry, record, maps, model, clock)


def _export(run_layout: layout.RunLayout, export_root: str, entry: CatalogEntry,
            record: RunRecord, maps: Sequence[ScopeMap], model: str | None,
            clock: Callable[[], float]) -> ExportResult:
    import tensorflow as tf

    from distributed.model import PREDICT, local_initializer
    from distributed.model.graphs import build_mode_graph

    tf.get_logger().setLevel("ERROR")  # TF1 SavedModel builder deprecation chatter
    timings = {}
    t = time.perf_counter()
    _check_export_root(export_root)
    ckpt_dir, manifest = _read_committed(run_layout, entry)
    config = record.config
    if model:
        config = dataclasses.replace(config, model=model)
    built = build_mode_graph(config, PREDICT, record.input_spec.placeholders)
    graph, features, spec = built.graph, built.features, built.spec
    with graph.as_default():
        reads = built.output_reads()
        by_name = {v.op.name: v for v in tf.compat.v1.global_variables()}
        # Graph variable -> its checkpoint tensor and block (partitioned ones
        # may be cut differently here than in training, or not at all).
        needed = restore_plan(
            by_name, reads, {v.op.name for v in tf.compat.v1.trainable_variables()},
            manifest, lambda name: _ckpt_name(name, maps),
            f"{entry.tier} checkpoint at step {entry.step}")
        loader = {g: (by_name[g], tf.compat.v1.placeholder(
            by_name[g].dtype.base_dtype, by_name[g].shape)) for g in needed}
        assigns = [v.assign(ph, read_value=False) for v, ph in loader.values()]
        init_rest = tf.compat.v1.variables_initializer(
            [v for n, v in by_name.items() if n not in needed])
        # What a server runs after restoring (Estimator's export does the
        # same): lookup tables (vocabulary columns serve raw strings), local
        # variables, the model's LOCAL_INIT_OP or scaffold's local_init_op.
        main_op = local_initializer(spec.scaffold)
        assets = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS)
        timings["build"] = time.perf_counter() - t
        t = time.perf_counter()
        # One read pass: every tensor is CRC-checked, the needed ones loaded.
        tensors = read_verified(ckpt_dir, manifest, {p.tensor for p in needed.values()},
                                lambda name: tf.as_dtype(name).as_numpy_dtype)
        timings["verify+read"] = time.perf_counter() - t
        t = time.perf_counter()
        sess = tf.compat.v1.Session(graph=graph)
        try:
            sess.run(init_rest)
            sess.run(assigns, {ph: block(tensors, needed[g])
                               for g, (_, ph) in loader.items()})
            del tensors
            timings["restore"] = time.perf_counter() - t
            t = time.perf_counter()
            version = entry.step
            final = os.path.join(export_root, str(version))
            if os.path.exists(final):
                raise StorageError(f"--export: version {version} already exists at {final}")
            tmp = os.path.join(export_root, f".{version}{layout.TMP_MARKER}{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                builder = tf.compat.v1.saved_model.Builder(tmp)
                signature = tf.compat.v1.saved_model.predict_signature_def(
                    inputs=dict(features), outputs=dict(spec.predictions))
                builder.add_meta_graph_and_variables(
                    sess, [tf.compat.v1.saved_model.tag_constants.SERVING],
                    signature_def_map={"serving_default": signature},
                    assets_collection=assets or None, main_op=main_op,
                    strip_default_attrs=True)
                builder.save()
                layout.fsync_tree(tmp)
                os.rename(tmp, final)
                layout.fsync_dir(export_root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            sess.close()
    timings["export"] = time.perf_counter() - t
    result = ExportResult(version, entry.step, final, timings, {
        "inputs": {k: _tensor_kind(t) for k, t in features.items()},
        "outputs": {k: _tensor_kind(t) for k, t in spec.predictions.items()}})
    _record_export(run_layout, entry, result, clock)
    return result


def _tensor_kind(tensor) -> str:
    """``float32 [-1, 8, 8]``: a tensor's dtype and shape (-1: any size)."""
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else None
    shape = "[?]" if dims is None else \
        "[" + ", ".join("-1" if d is None else str(d) for d in dims) + "]"
    return f"{tensor.dtype.name} {shape}"


def _record_export(run_layout, entry: CatalogEntry, result: ExportResult,
                   clock: Callable[[], float]) -> None:
    """Adds a row to the run's exports sidecar table (``<run>/exports/*.parquet``)."""
    import io
    row = {"run": run_layout.run, "version": result.version, "step": entry.step,
           "tier": entry.tier, "source": entry.path,
           "export_dir": os.path.abspath(result.export_dir),
           "exported_at": _dt.datetime.fromtimestamp(clock(), _dt.timezone.utc),
           "seconds": float(sum(result.seconds.values()))}
    table = pa.Table.from_pylist([row], schema=EXPORT_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    directory = os.path.join(run_layout.root, EXPORTS_DIR)
    os.makedirs(directory, exist_ok=True)
    stamp = int(clock() * 1e6)
    layout.atomic_write_bytes(
        os.path.join(directory, f"{layout.step_dirname(entry.step)}.{stamp}.parquet"),
        sink.getvalue())


def list_versions(export_root: str) -> list[int]:
    """Committed version directories under ``export_root`` (numeric names)."""
    try:
        return sorted(int(n) for n in os.listdir(export_root) if n.isdigit())
    except FileNotFoundError:
        return []


def prune_versions(export_root: str, keep: int) -> list[int]:
    """Deletes all but the newest ``keep`` versions; returns the deleted ones."""
    versions = list_versions(export_root)
    doomed = versions[:-keep] if keep > 0 else []
    for v in doomed:
        # Rename out of the numeric namespace first so a server never sees half.
        path = os.path.join(export_root, str(v))
        trash = os.path.join(export_root, f".{v}{layout.TMP_MARKER}deleting")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed

