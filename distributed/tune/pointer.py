"""A trial's Tune checkpoint: a small directory that names committed checkpoints.

Ray Tune copies whatever a trial reports as its checkpoint into the
experiment's storage. The checkpoints themselves are already committed under
the run's storage (sharded, checksummed, in the catalog), so the trial reports
only ``checkpoint_pointer.json``, which names them: no checkpoint byte is
copied twice. It names two checkpoints of one report:

- the *serving* checkpoint the report is about (``storage``, ``run``,
  ``step``): what ``jobs.restore --tune-checkpoint DIR`` exports;
- the *full* checkpoint a trial goes on from (``resume_run``, ``resume_step``):
  the trial's own newest, or the one PBT's exploit started it from. ``None``
  until the run has one.

Plain JSON with a ``schema_version``; nothing in it is executed or unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os

from distributed.errors import ConfigError

POINTER_FILE = "checkpoint_pointer.json"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CheckpointPointer:
    """What one Tune report's checkpoint stands for.

    Attributes:
        storage: The runs' storage (a directory or an object store URI).
        run: The run of the reported serving checkpoint.
        step: The reported serving checkpoint's step.
        trial_id: The Tune trial that reported it (a trial restored from its
            own checkpoint resumes its run; from another's, PBT exploited).
        resume_run: The run of the full checkpoint to go on from.
        resume_step: Its step.
    """

    storage: str
    run: str
    step: int
    trial_id: str
    resume_run: str | None = None
    resume_step: int | None = None

    @property
    def resumable(self) -> bool:
        """Whether it names a full checkpoint to go on from."""
        return self.resume_run is not None and self.resume_step is not None

    def write(self, directory: str) -> str:
        """Writes ``checkpoint_pointer.json`` into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, POINTER_FILE)
        with open(path, "w") as f:
            json.dump({"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)},
                      f, indent=2)
        return path


def read_pointer(directory: str) -> CheckpointPointer:
    """Reads a Tune checkpoint directory a trial of :mod:`distributed.tune` reported.

    Raises:
        ConfigError: It is no such directory, or its pointer is malformed or
            of a newer schema.
    """
    path = os.path.join(directory, POINTER_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{directory!r} is not a Tune checkpoint of a distributed.tune trial (it "
            f"has no {POINTER_FILE}); pass a trial's checkpoint directory, such as "
            "<experiment>/<trial>/checkpoint_000003, or Result.checkpoint.path") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path!r} cannot be read as a checkpoint pointer ({e})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{path!r} has schema_version {version!r}; this version of the project "
            f"reads {SCHEMA_VERSION}: restore it with the version that wrote it")
    fields = {f.name for f in dataclasses.fields(CheckpointPointer)}
    try:
        pointer = CheckpointPointer(**{k: v for k, v in data.items() if k in fields})
    except TypeError as e:
        raise ConfigError(f"{path!r} is not a complete checkpoint pointer ({e})") from None
    if not isinstance(pointer.step, int) or not isinstance(pointer.run, str):
        raise ConfigError(f"{path!r} names no checkpoint (run {pointer.run!r}, step "
                          f"{pointer.step!r})")
    return pointer
