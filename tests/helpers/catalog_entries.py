"""Catalog rows made by hand, for tests of the catalog and of what reads it
(retention, damage) without writing a checkpoint."""

import datetime as dt

from distributed.checkpoint import CatalogEntry


def entry(step, tier="serving", loss=None, run="run"):
    """A row of a small checkpoint at ``step``; ``loss`` is its only metric."""
    return CatalogEntry(
        run=run, step=step, tier=tier,
        path=f"checkpoints/{tier}/step-{step:09d}", num_tensors=3, num_bytes=100,
        num_shards=1, save_seconds=0.1,
        committed_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        metrics={} if loss is None else {"loss": loss}, selection="{}",
        manifest_crc32c=0x1234ABCD)
