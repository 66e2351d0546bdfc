"""``bench_input.py --position``: what saving the input position costs.

The acceptance model of exactly-once input (``tests/helpers/position_models``:
ids 0..2047, a per-id count, one weight per id) on a ``tf.data`` input, 2 CPU
workers, batch 16, a full checkpoint every ``--position-full-every`` steps:

* steps/s with ``input_position: exact`` vs ``restart`` (runs alternate, the
  figure is each one's median over its steady rounds; the ratio in one run);
* the full checkpoints' save time and bytes (catalog rows) with a
  10,000-element shuffle buffer vs none (both ``exact``).
"""

from __future__ import annotations

import statistics
import tempfile

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
    sps = {"exact": [], "restart": []}
    saves = {}
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
    exact, restart = statistics.median(sps["exact"]), statistics.median(sps["restart"])
    print(f"steps/s  exact {exact:.1f}  restart {restart:.1f}  ratio "
          f"{exact / restart:.3f}x (median of {args.pairs} alternating runs each)")
    for buffer, rows in saves.items():
        print(f"full checkpoint, shuffle buffer {buffer:5}: median save "
              f"{statistics.median(r['save_seconds'] for r in rows):.3f} s, "
              f"{statistics.median(r['num_bytes'] for r in rows) / 1024:.1f} KiB, input "
              f"positions {statistics.median(r['positions'] for r in rows) / 1024:.1f} KiB")


def _full_saves(storage: str, run: str) -> list[dict]:
    """Each full checkpoint's save time, bytes, and its positions' bytes."""
    from distributed.checkpoint import Catalog, RunLayout
    from distributed.checkpoint.manifest import read_manifest
    layout = RunLayout(storage, run)
    rows = []
    for entry in Catalog(layout).entries("full"):
        manifest = read_manifest(layout.checkpoint_dir("full", entry.step))
        positions = sum(r.length for name, records in manifest.by_name().items()
                        if name.startswith("input_position/") for r in records)
        rows.append({"save_seconds": entry.save_seconds, "num_bytes": entry.num_bytes,
                     "positions": positions})
    return rows
