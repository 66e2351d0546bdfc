"""Benchmark checkpoint upload/download to object storage against
``pyarrow.fs.copy_files`` of the same files, in one run.

    .venv/bin/python scripts/bench_upload.py                        # 8 x 32 MiB
    .venv/bin/python scripts/bench_upload.py --shards 4 --shard-mib 128 --repeats 5

The store is a real S3 server (moto_server) on loopback, started here. A
checkpoint-shaped directory (``--shards`` files of random bytes plus a small
index and manifest) is uploaded by ``Remote.upload_dir`` and by ``copy_files``,
alternating, ``--repeats`` times each; then downloaded the same way. Figures
are medians, printed as ratios against ``copy_files`` (ours / copy_files time:
below 1 is faster). Absolute MiB/s are those of moto, a Python server, not of
a real object store.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow.fs as pafs  # noqa: E402

from distributed.storage.remote import open_remote  # noqa: E402
from tests.helpers import s3_server  # noqa: E402


def make_checkpoint(directory: str, shards: int, shard_mib: float) -> int:
    os.makedirs(directory)
    size = int(shard_mib * (1 << 20))
    for k in range(shards):
        with open(os.path.join(directory, f"model.ckpt.data-{k:05d}-of-{shards:05d}"),
                  "wb") as f:
            f.write(os.urandom(size))
    for name, n in (("model.ckpt.index", 4096), ("manifest.parquet", 8192)):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(os.urandom(n))
    return shards * size + 4096 + 8192


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=float, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_upload_")
    try:
        src = os.path.join(work, "step-000000001")
        total = make_checkpoint(src, args.shards, args.shard_mib)
        with s3_server.running(skip=False) as server:
            bucket = server.make_bucket("bench")
            remote = open_remote(f"s3://{bucket}/runs", server.options())
            local = pafs.LocalFileSystem()
            times: dict[str, list[float]] = {k: [] for k in
                                             ("ours_up", "copy_up", "ours_down", "copy_down")}
            for i in range(-1, args.repeats):  # round -1 warms up, untimed
                for who in ("ours", "copy") if i % 2 == 0 else ("copy", "ours"):
                    rel = f"{who}-{i}"
                    if who == "ours":
                        up = timed(lambda: remote.upload_dir(src, rel, args.threads))
                    else:
                        up = timed(lambda: pafs.copy_files(
                            src, remote.path(rel), source_filesystem=local,
                            destination_filesystem=remote.fs))
                    dst = os.path.join(work, rel)
                    if who == "ours":
                        down = timed(lambda: remote.download_dir(rel, dst, args.threads))
                    else:
                        os.makedirs(dst)
                        down = timed(lambda: pafs.copy_files(
                            remote.path(rel), dst, source_filesystem=remote.fs,
                            destination_filesystem=local))
                    assert sum(os.path.getsize(os.path.join(dst, n))
                               for n in os.listdir(dst)) == total
                    if i >= 0:
                        times[f"{who}_up"].append(up)
                        times[f"{who}_down"].append(down)
                    remote.delete_dir(rel)
                    shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = total / (1 << 20)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"checkpoint: {args.shards} shards x {args.shard_mib:g} MiB = {mib:.0f} MiB; "
          f"{args.repeats} alternating repeats after a warm-up; medians; loopback "
          "moto_server")
    for way in ("up", "down"):
        ours, base = med[f"ours_{way}"], med[f"copy_{way}"]
        print(f"{way + 'load':8s}  ours/copy_files time = {ours / base:.2f}  "
              f"(copy_files {mib / base:.0f} MiB/s, ours {mib / ours:.0f} MiB/s; "
              f"all ours: {', '.join(f'{t:.2f}' for t in times[f'ours_{way}'])} s, "
              f"copy_files: {', '.join(f'{t:.2f}' for t in times[f'copy_{way}'])} s)")


if __name__ == "__main__":
    main()
