"""What the driver tells the user about the run's checkpoints: the closing
table, and where a finished or stopped run stands and how to go on. Read from
the catalog, so a re-run tells the same story as the run that wrote it."""

from __future__ import annotations

import os

from distributed.config import TrainConfig


def format_summary(config: TrainConfig, entries: list[dict]) -> str:
    """The table of the run's committed checkpoints the job prints last."""
    names = ["loss"] + sorted({k for e in entries for k in e["metrics"]
                               if k.startswith("eval/")})
    widths = [max(8, len(n)) for n in names]
    lines = [f"committed checkpoints of run {config.run!r} "
             f"({os.path.join(config.storage_path, config.run)}; loss: the training "
             "loss at that step):",
             f"  {'tier':8} {'step':>8} {'tensors':>8} {'MiB':>9} {'shards':>6} "
             + " ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + "  path"]
    for e in entries:
        values = [e["metrics"].get(n) for n in names]
        lines.append(f"  {e['tier']:8} {e['step']:>8} {e['num_tensors']:>8} "
                     f"{e['num_bytes'] / 2**20:>9.2f} {e['num_shards']:>6} "
                     + " ".join(f"{'' if v is None else f'{v:.4f}':>{w}}"
                                for v, w in zip(values, widths))
                     + f"  {e['path']}")
    if not entries:
        lines.append("  (none)")
    return "\n".join(lines)


def complete_at(config: TrainConfig) -> int | None:
    """The step of the run's newest full checkpoint if it is at or past
    ``config.steps`` (nothing is left to train), else ``None``. Read from the
    local catalog (an object store's staging mirror, which may lag the store:
    then the coordinator, which syncs it, finds the run complete instead)."""
    try:
        newest = _newest_full_step(config)
    except OSError:  # StorageError too: the driver's check_storage says it later
        return None
    return newest if newest is not None and newest >= config.steps else None


def complete_note(config: TrainConfig, step: int) -> str:
    """Why a re-run of a finished run trains nothing, and what to do instead."""
    return (f"run {config.run!r} is complete: its full checkpoint is at step "
            f"{step} and steps is {config.steps}. To train further, re-run "
            f"with a larger --steps (it resumes from step {step}); for a new "
            "run, pick another --run.")


def resume_note(config: TrainConfig) -> str:
    """Where a stopped run stands: its newest full checkpoint, and how to go on."""
    newest = _newest_full_step(config)
    where = (f"the newest full checkpoint is at step {newest}" if newest is not None
             else "no full checkpoint yet: a re-run starts from the beginning")
    return (f"The checkpoints committed before it are intact ({where}, under "
            f"{os.path.join(config.storage_path, config.run)}); fix the cause and "
            "re-run with the same --run to resume.")


def committed_entries(config: TrainConfig) -> list[dict]:
    """The catalog's rows, as the summary of a run that trained reports them."""
    from distributed.checkpoint.store import CheckpointStore
    store = CheckpointStore(config.storage_path, config.run)
    return [e.to_json_dict() for e in store.catalog.entries()]


def _newest_full_step(config: TrainConfig) -> int | None:
    """The step of the run's newest committed full checkpoint (the catalog's
    row names; no table is read)."""
    from distributed.checkpoint.store import CheckpointStore
    keys = CheckpointStore(config.storage_path, config.run).catalog.committed_keys()
    return max((step for step, tier in keys if tier == "full"), default=None)
