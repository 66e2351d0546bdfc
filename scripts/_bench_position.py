"""``bench_input.py --position``: what saving the input position costs.

The acceptance model of exactly-once input (``tests/helpers/position_models``:
ids 0..2047, a per-id count, one weight per id), 2 CPU workers, batch 16,
runs through ``trainer.train`` in this process on one local Ray:

* steps/s with ``input_position: exact`` vs ``restart`` on a ``tf.data``
  input, a full checkpoint every ``--position-full-every`` steps (runs
  alternate, the figure is each one's median over its steady rounds; the
  ratio in one run);
* the full checkpoints' save time and bytes (catalog rows) with a
  10,000-element shuffle buffer vs none (both ``exact``), and what the
  position's bytes are: the serialized iterator state taken apart entry by
  entry (bytes per buffered element: key, type name, the element, framing);
* the resume of a plain Python generator (``generator_input_fn``: the workers
  replay the consumed batches) vs a resumable one (``resumable_input_fn``,
  ``start_batch``: no replay) at the same position, after each of
  ``--position-resume-at`` batches (default 1,000 and 5,000): from the driver,
  the time from ``train()`` to the first step of a resumed run (alternating,
  medians, beside a fresh start's), and, in this process, the source's own
  restore (``PythonSource.restore_position`` plus the first batch after it).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

MODELS = "tests.helpers.position_models"


def _config(storage: str, run: str, steps: int, full_every: int, **overrides):
    from distributed import config as config_lib
    data = {"storage": storage, "run": run, "model": f"{MODELS}:seen_model_fn",
            "input": f"{MODELS}:dataset_input_fn", "steps": steps, "batch_size": 16,
            "workers": 2, "cpus_per_worker": 0.5, "log_every": full_every,
            "optimizer": {"name": "sgd", "learning_rate": 0.5},
            "checkpoint": {"serving_every": 0, "full_every": full_every},
            "retention": {"full": {"keep_last": 1000}}, "collective_timeout": 120.0}
    data.update(overrides)
    return config_lib.from_dict(data)


def _steady_sps(summary) -> float:
    rounds = summary["rounds"][1:-1]  # not the first (warm-up), not the last
    return statistics.median(r.steps_per_sec for r in rounds)


def run(args, log) -> None:
    from distributed.train import trainer
    from tests.conftest import start_local_ray
    steps, every = args.steps, args.position_full_every
    resume_at = [int(n) for n in str(args.position_resume_at).split(",") if n.strip()]
    sps = {"exact": [], "restart": []}
    saves = {}
    resumes: dict = {n: {"fresh": [], "generator": [], "resumable": []} for n in resume_at}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as storage, \
            start_local_ray(4, log_to_driver=False):
        for i in range(args.pairs):
            for mode in ("exact", "restart"):
                summary = trainer.train(_config(storage, f"{mode}-{i}", steps, every,
                                                input_position=mode), echo=lambda _: None)
                sps[mode].append(_steady_sps(summary))
                log(f"position: {mode:7} run {i}: {sps[mode][-1]:.1f} steps/s")
        for buffer in (0, 10000):
            trainer.train(_config(storage, f"buffer-{buffer}", 4 * every, every,
                                  input_params={"buffer": buffer}), echo=lambda _: None)
            saves[buffer] = _full_saves(storage, f"buffer-{buffer}")
            log(f"position: shuffle buffer {buffer}: {len(saves[buffer])} full saves")
        for n in resume_at:
            _resume_runs(storage, n, args.pairs, resumes[n], log)
    log(f"position: Ray runs done in {time.perf_counter() - t_start:.0f}s")
    replay = {n: _source_restore(n, max(3, args.pairs + 1)) for n in resume_at}
    anatomy = {buffer: _position_anatomy(buffer) for buffer in (0, 10000)}

    exact, restart = statistics.median(sps["exact"]), statistics.median(sps["restart"])
    print()
    print(f"steps/s  exact {exact:.1f}  restart {restart:.1f}  ratio "
          f"{exact / restart:.3f}x (median of {args.pairs} alternating runs each; "
          f"runs {[round(x, 1) for x in sps['exact']]} vs "
          f"{[round(x, 1) for x in sps['restart']]})")
    for buffer, rows in saves.items():
        print(f"full checkpoint, shuffle buffer {buffer:5}: median save "
              f"{statistics.median(r['save_seconds'] for r in rows):.3f} s, "
              f"{statistics.median(r['num_bytes'] for r in rows) / 1024:.1f} KiB, input "
              f"positions {statistics.median(r['positions'] for r in rows) / 1024:.1f} KiB "
              f"(per worker {statistics.median(r['per_worker'] for r in rows) / 1024:.1f} "
              f"KiB; {len(rows)} saves)")
    s0 = statistics.median(r["save_seconds"] for r in saves[0])
    s10 = statistics.median(r["save_seconds"] for r in saves[10000])
    n0 = statistics.median(r["num_bytes"] for r in saves[0])
    n10 = statistics.median(r["num_bytes"] for r in saves[10000])
    print(f"  buffer 10000 vs none: save time {s10 / s0:.2f}x, bytes {n10 / n0:.1f}x")
    for buffer, a in anatomy.items():
        print(_describe_anatomy(buffer, a))
    for n in resume_at:
        med = {k: statistics.median(v) for k, v in resumes[n].items()}
        print(f"resume after {n} batches per worker (time from train() to the first "
              f"step, median of {args.pairs}): generator replay {med['generator']:.2f} s, "
              f"resumable {med['resumable']:.2f} s, ratio "
              f"{med['generator'] / med['resumable']:.2f}x (fresh start "
              f"{med['fresh']:.2f} s; runs {_rounded(resumes[n])})")
        r = replay[n]
        print(f"  the source alone (this process, restore + first batch, median of "
              f"{len(r['generator'])}): replay {1e3 * r['generator_med']:.1f} ms "
              f"({1e6 * r['generator_med'] / n:.1f} us/batch), start_batch "
              f"{1e3 * r['resumable_med']:.2f} ms, ratio replay / start_batch "
              f"{r['generator_med'] / r['resumable_med']:.2f}x")
    print("(the replay costs what reading the batches costs: this generator makes a "
          "batch in microseconds; one that reads and decodes files pays its own "
          "per-batch time x the batches consumed, per worker, at every resume)")


def _rounded(runs: dict) -> dict:
    return {k: [round(x, 2) for x in v] for k, v in runs.items()}


def _resume_runs(storage: str, n: int, pairs: int, out: dict, log) -> None:
    """A run trained to ``n`` steps (full checkpoint at ``n``), resumed by each
    kind of generator from a copy of it, alternating, with a fresh start of
    the same config beside them; records each one's seconds to its first step."""
    from distributed.train import trainer
    base = os.path.join(storage, f"resume-base-{n}")
    t = time.perf_counter()
    trainer.train(_config(base, "run", n, n, input=f"{MODELS}:generator_input_fn"),
                  echo=lambda _: None)
    log(f"position: trained {n} steps to resume from ({time.perf_counter() - t:.0f}s)")
    more = 50
    for i in range(pairs):
        for kind in ("fresh", "generator", "resumable"):
            copy = os.path.join(storage, f"resume-{n}-{kind}-{i}")
            fn = "generator_input_fn" if kind == "fresh" else f"{kind}_input_fn"
            if kind == "fresh":
                cfg = _config(copy, "run", more, more, input=f"{MODELS}:{fn}")
            else:
                shutil.copytree(base, copy)
                cfg = _config(copy, "run", n + more, n, log_every=more,
                              input=f"{MODELS}:{fn}")
            lines: list[str] = []
            summary = trainer.train(cfg, echo=lines.append)
            if kind != "fresh" and not any(f"from its full checkpoint at step {n}" in ln
                                           for ln in lines):
                raise RuntimeError(f"the {kind} run did not resume at {n}:\n"
                                   + "\n".join(lines))
            out[kind].append(summary["first_step_seconds"])
            log(f"position: resume at {n}, {kind:9} {i}: first step after "
                f"{out[kind][-1]:.2f} s")
            shutil.rmtree(copy, ignore_errors=True)


def _source_restore(n: int, reps: int) -> dict:
    """Seconds of ``PythonSource.restore_position`` to ``n`` consumed batches
    plus the first batch after it, for the plain generator (a replay through
    the reader thread's queue) and the resumable one (a new iterator from
    ``start_batch``), alternating, worker 0's shard; checks both then feed
    the same batch."""
    import numpy as np
    import tensorflow as tf

    from distributed.inputs.sources import PythonSource, call_input_fn, takes_start_batch
    from tests.helpers import position_models as pm
    position = json.dumps({"consumed_batches": n}).encode()
    out: dict = {"generator": [], "resumable": []}
    for _ in range(reps):
        first = {}
        for kind, fn in (("generator", pm.generator_input_fn),
                         ("resumable", pm.resumable_input_fn)):
            def reopen(batch, fn=fn):
                return call_input_fn(fn, "bench", 0, 2, 16, {}, start_batch=batch)
            with tf.Graph().as_default():
                source = PythonSource(call_input_fn(fn, "bench", 0, 2, 16, {}), "bench",
                                      "input", 0, prefetch=2,
                                      reopen=reopen if takes_start_batch(fn) else None)
                features, _ = source.tensors()
            source.start()
            t = time.perf_counter()
            source.restore_position(None, position)
            feed = source.feed(n)
            out[kind].append(time.perf_counter() - t)
            source.close()
            first[kind] = feed[features["id"]]
            assert source.consumed == n + 1, (kind, source.consumed)
        np.testing.assert_array_equal(first["generator"], first["resumable"])
    return {**out, **{f"{k}_med": statistics.median(v) for k, v in out.items()}}


def _position_anatomy(buffer: int, batches: int = 10) -> dict:
    """Worker 0's position with ``buffer`` after ``batches`` steps, as the
    worker takes it (``DatasetSource.position``), taken apart: a serialized
    ``DT_VARIANT`` tensor of one ``VariantTensorDataProto`` per checkpoint
    entry (varint lengths first), each with a type name, its key(s) as
    metadata and the entry's value as a tensor."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from distributed.checkpoint.tf_index import read_varint
    from distributed.inputs.sources import DatasetSource
    from tests.helpers import position_models as pm
    graph = tf.Graph()
    with graph.as_default():
        source = DatasetSource(pm.dataset_input_fn(0, 2, 16, {"buffer": buffer}),
                               "bench", 0)
        features, _ = source.tensors()
        with tf.compat.v1.Session(graph=graph) as sess:
            source.start(sess)
            for _ in range(batches):
                sess.run(features)
            data = source.position(sess)
    proto = tensor_pb2.TensorProto.FromString(data)
    content = proto.tensor_content
    count = proto.tensor_shape.dim[0].size if proto.tensor_shape.dim else 1
    lengths, i = [], 0
    for _ in range(count):
        length, i = read_varint(content, i)
        lengths.append(length)
    header, entries = i, []
    for length in lengths:
        entries.append((length, tensor_pb2.VariantTensorDataProto.FromString(
            content[i:i + length])))
        i += length
    buffered = [(length, e) for length, e in entries if b":buffer::" in e.metadata]
    mean = lambda xs: statistics.mean(xs) if xs else 0.0  # noqa: E731
    element = buffered[0][1] if buffered else None
    return {
        "bytes": len(data), "entries": count, "header": header,
        "outer": len(data) - len(content),
        "buffered": len(buffered), "buffered_bytes": sum(n for n, _ in buffered),
        "per_element": mean([n for n, _ in buffered]),
        "varint": mean([len(_encode_varint(n)) for n, _ in buffered]),
        "type_name": mean([len(e.type_name) for _, e in buffered]),
        "key": mean([len(e.metadata) for _, e in buffered]),
        "value": mean([sum(t.ByteSize() for t in e.tensors) for _, e in buffered]),
        "value_payload": mean([sum(len(v.metadata) for t in e.tensors
                                   for v in t.variant_val) for _, e in buffered]),
        "value_type": (element.tensors[0].variant_val[0].type_name
                       if element is not None and element.tensors
                       and element.tensors[0].variant_val else ""),
        "example_key": element.metadata.decode(errors="replace") if element else "",
        "other": count - len(buffered),
        "other_bytes": sum(n for n, e in entries if b":buffer::" not in e.metadata),
    }


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _describe_anatomy(buffer: int, a: dict) -> str:
    if not a["buffered"]:
        return (f"position of worker 0, shuffle buffer {buffer}: {a['bytes']} B: "
                f"{a['entries']} checkpoint entries of the iterator (no buffered "
                f"element)")
    framing = a["per_element"] - a["type_name"] - a["key"] - a["value"]
    return (
        f"position of worker 0, shuffle buffer {buffer}, after 10 batches: "
        f"{a['bytes']:,} B = {a['entries']:,} checkpoint entries of the iterator "
        f"({a['header']:,} B of varint lengths, {a['outer']} B of TensorProto): the "
        f"shuffle buffer's {a['buffered']:,} elements take {a['buffered_bytes']:,} B = "
        f"{a['per_element']:.1f} B each + {a['varint']:.0f} B length: key "
        f"{a['key']:.1f} B ({a['example_key']!r}), type name {a['type_name']:.0f} B, "
        f"the element {a['value']:.1f} B (a {a['value_type']} tensor: "
        f"{a['value_payload']:.1f} B of snappy payload for one int64 id, 8 B of data), "
        f"proto framing {framing:.1f} B; the other {a['other']} entries "
        f"{a['other_bytes']:,} B. {a['buffered']:,} x "
        f"{a['per_element'] + a['varint']:.1f} B = "
        f"{a['buffered'] * (a['per_element'] + a['varint']) / 1e6:.2f} MB. The buffer "
        f"is full although a worker's shard has 1,024 ids: TF fuses shuffle().repeat() "
        f"into ShuffleAndRepeat, whose buffer spans epochs; the ids' own bytes are "
        f"{8 / (a['per_element'] + a['varint']):.0%} of it")


def _full_saves(storage: str, run: str) -> list[dict]:
    """Each full checkpoint's save time, bytes, and its positions' bytes."""
    from distributed.checkpoint import Catalog, RunLayout
    from distributed.checkpoint.manifest import read_manifest
    layout = RunLayout(storage, run)
    rows = []
    for entry in Catalog(layout).entries("full"):
        manifest = read_manifest(layout.checkpoint_dir("full", entry.step))
        sizes = [sum(r.length for r in records)
                 for name, records in manifest.by_name().items()
                 if name.startswith("input_position/")]
        rows.append({"save_seconds": entry.save_seconds, "num_bytes": entry.num_bytes,
                     "positions": sum(sizes),
                     "per_worker": statistics.median(sizes) if sizes else 0})
    return rows
