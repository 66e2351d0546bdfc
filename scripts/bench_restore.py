"""Benchmark the restore job: command-to-SavedModel time and its split, and
restore read throughput vs reading the same bytes raw, in one run.

    .venv/bin/python scripts/bench_restore.py            # digits CNN + ~1 GiB MLP
    .venv/bin/python scripts/bench_restore.py --gib 0.25

Checkpoints are made in-process by the real Coordinator save path (no Ray).
Page caches are dropped before each cold measurement when running as root;
where they cannot be dropped the rows say NOT cold and carry no PASS/FAIL.
The raw and restore reads alternate which goes first.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_checkpoint import drop_caches  # noqa: E402  (scripts/ is on sys.path)


def make_run(storage, run, model, params):
    from distributed import config as config_lib
    from distributed.train.coordinator import Coordinator
    cfg = config_lib.from_dict({"model": model, "model_params": params, "storage": storage,
                                "run": run, "workers": 1, "steps": 1,
                                "selection": {"policy": "inference"}})
    coord = Coordinator(cfg.to_dict())
    coord.build()
    coord.open_run()
    names = {v.op.name: v for v in coord.tg.variables}
    values = coord.sess.run({n: names[n] for n in coord.serving_names})
    entry = coord.save(1, "serving", values, {"loss": 1.0}).entry  # a CheckpointEvent
    coord.sess.close()
    return entry


def raw_read_seconds(ckpt_dir):
    total = 0
    start = time.perf_counter()
    for name in sorted(os.listdir(ckpt_dir)):
        if ".data-" in name:
            with open(os.path.join(ckpt_dir, name), "rb", buffering=0) as f:
                while True:
                    chunk = f.read(64 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
    return time.perf_counter() - start, total


def read_path_ratio(ckpt_dir, repeats=6):
    """Raw read vs the restore job's read path (read_verified: every tensor
    CRC-checked, the needed ones loaded), medians of ``repeats`` each. The
    order alternates (raw first, then ours first, ...), so neither side always
    reads first. Returns ``(raw median, ours median, raws, ours, cold)``;
    ``cold`` is whether the page cache was dropped before every read."""
    import statistics

    import tensorflow as tf
    from distributed.checkpoint.manifest import read_manifest
    from distributed.checkpoint.verify import read_verified
    manifest = read_manifest(ckpt_dir)
    names = {t.name for t in manifest.tensors}
    raw, ours = [], []
    cold = True

    def read_raw():
        raw.append(raw_read_seconds(ckpt_dir)[0])

    def read_ours():
        t = time.perf_counter()
        out = read_verified(ckpt_dir, manifest, names,
                            lambda n: tf.as_dtype(n).as_numpy_dtype)
        ours.append(time.perf_counter() - t)
        del out

    for i in range(repeats):
        for read in ((read_raw, read_ours) if i % 2 == 0 else (read_ours, read_raw)):
            cold = drop_caches() and cold
            read()
    return statistics.median(raw), statistics.median(ours), raw, ours, cold


def bench(label, storage, run, model, params, export_root):
    entry = make_run(storage, run, model, params)
    ckpt_dir = os.path.join(storage, run, entry["path"])
    cold = drop_caches()
    raw_s, nbytes = raw_read_seconds(ckpt_dir)
    cold = drop_caches() and cold
    cmd = [sys.executable, "-m", "jobs.restore", "--storage", storage, "--run", run,
           "--export", export_root]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr)
    line = [l for l in out.stdout.splitlines() if l.startswith("exported")][-1]
    split = line[line.index("(") + 1:line.rindex(")")]
    read_s = float(split.split("verify+read ")[1].split("s")[0])
    # Without dropped caches the reads come from memory: label them so, and
    # judge nothing by them.
    kind = "cold" if cold else "warm, NOT cold"
    print(f"\n{label}: {nbytes / 2**20:,.1f} MiB selected, caches "
          f"{'dropped' if cold else 'NOT dropped (not root or no /proc/sys/vm/drop_caches)'}")
    print(f"  command -> SavedModel        {wall:8.2f} s   ({split})")
    raw = nbytes / raw_s / 1e9
    rate = nbytes / read_s / 1e9
    ratio = rate / raw
    print(f"  raw read of the shards ({kind}) {raw:7.2f} GB/s")
    print(f"  in the job, one {kind} run: verify+read {rate:.2f} GB/s = {ratio:.2f}x raw "
          + ("(single cold reads on this disk vary 2-3x; see the medians below)" if cold
             else "(from the page cache: says nothing about the disk)"))
    if nbytes > 64 << 20:
        raw_m, ours_m, raws, ourss, all_cold = read_path_ratio(ckpt_dir)
        ratio = raw_m / ours_m
        if all_cold:
            verdict = f"(target >= 0.8x) {'PASS' if ratio >= 0.8 else 'FAIL'}"
            runs = "alternating cold runs"
        else:
            verdict = "(NOT cold: page cache not dropped; no PASS/FAIL)"
            runs = "alternating runs, NOT cold"
        print(f"  restore read path, median of {len(raws)} {runs}: "
              f"{nbytes / ours_m / 1e9:.2f} GB/s vs raw {nbytes / raw_m / 1e9:.2f} GB/s "
              f"= {ratio:.2f}x {verdict}")
        print(f"    raw s {[round(x, 2) for x in raws]}  ours s {[round(x, 2) for x in ourss]}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="size of the big model")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_restore_")
    try:
        bench("digits CNN", os.path.join(root, "s"), "cnn",
              "distributed.examples.digits:cnn_bn_model_fn", {}, os.path.join(root, "e1"))
        hidden = int((args.gib * 2**30 / 4) ** 0.5)
        bench(f"MLP 64-{hidden}-{hidden}-10 (~{args.gib} GiB)", os.path.join(root, "s"),
              "big", "distributed.examples.digits:mlp_model_fn",
              {"hidden": [hidden, hidden]}, os.path.join(root, "e2"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
