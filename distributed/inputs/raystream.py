"""A Ray Data input as one ordered stream of rows, dealt to the workers in
chunks, with a position a full checkpoint can hold.

The dataset is read in its own order (Ray Data's ``preserve_order``), epoch
after epoch, so every row has an address: ``(epoch, offset)``. A
:class:`Feeder` actor (one per worker group) cuts the rows into chunks of
``chunk_rows`` rows and deals them round-robin: chunk ``j`` goes to worker
``j mod workers``. It hands out block references and row ranges, never the
data: each worker fetches the blocks its chunks overlap from the object store
and cuts them into batches (:func:`feed_batches`).

Every worker consumes one batch per step, so after ``k`` batches each worker
has trained on the first ``k * batch_size`` rows of its chunks, and the
feeder, which knows what it dealt to whom, knows exactly which rows those
were. The position it writes for a full checkpoint (:meth:`Feeder.position`)
is a plan: the rows of dealt chunks not yet trained on (``tails``, in chunk
order) and the address the stream goes on from (``next``). A resume deals
the tails first (tail ``i`` to worker ``i mod workers``: with the same
workers, each gets back the rest of its own chunk and the run trains on the
same batches as one that never stopped), then regular chunks from ``next``.
On another worker count the same plan is dealt over the new workers: each
row of the epoch in progress is still trained on once, in another order.

A plan is independent of block boundaries (a re-read may cut blocks
differently); it needs the rows in the same order when the dataset is read
again, which :func:`check_order` checks where it can.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from distributed.errors import ConfigError, DistributedError, user_code
from distributed.inputs import raydata
from distributed.inputs.sources import PythonSource

log = logging.getLogger(__name__)

KIND = "ray_data"
CHUNK_ROWS = 1024  # rows dealt at a time (rounded up to whole batches)


def chunk_rows(batch_size: int) -> int:
    return batch_size * max(1, -(-CHUNK_ROWS // batch_size))


@dataclass(frozen=True)
class Plan:
    """The rows to read: ``tails`` (each a list of ``(epoch, lo, hi)``
    ranges: a chunk's rows not trained on), then every row from ``next``
    (an ``(epoch, offset)`` address) on."""

    tails: tuple[tuple[tuple[int, int, int], ...], ...] = ()
    next: tuple[int, int] = (0, 0)

    def encode(self) -> bytes:
        return json.dumps({"kind": KIND, "version": 1, "next": list(self.next),
                           "tails": [[list(r) for r in tail] for tail in self.tails]},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, blob: bytes) -> "Plan | None":
        """The plan of a position; ``None`` for a position of another input
        kind (a ``tf.data`` iterator state, a Python input's count)."""
        try:
            data = json.loads(blob)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or data.get("kind") != KIND:
            return None
        if data.get("version") != 1:
            raise ConfigError(f"the checkpoint's Ray Data input position is of version "
                              f"{data.get('version')}, this version reads 1; resume with "
                              "the version that wrote it or set input_position: restart")
        return cls(tuple(tuple(tuple(int(v) for v in r) for r in tail)
                         for tail in data["tails"]),
                   tuple(int(v) for v in data["next"]))

    def rows(self) -> int:
        return sum(hi - lo for tail in self.tails for _, lo, hi in tail)

    def describe(self) -> str:
        epoch, offset = self.next
        tails = (f"; first the untrained rest of {len(self.tails)} chunk(s) "
                 f"({self.rows()} rows)" if self.tails else "")
        return f"epoch {epoch} from row {offset}{tails}"


def is_plan(blob: bytes) -> bool:
    """Whether a saved position is a Ray Data input's (whose plan does not
    depend on the worker count)."""
    try:
        return Plan.decode(blob) is not None
    except ConfigError:
        return True


@dataclass
class Chunk:
    """Rows dealt to one worker: ``pieces`` (block ref, first row, end row
    within the block) and the same rows as stream addresses (``ranges``)."""

    index: int
    pieces: list = field(default_factory=list)
    ranges: list = field(default_factory=list)
    rows: int = 0
    tail: int | None = None  # the plan's tail this chunk reads, if one


@dataclass
class _Piece:
    epoch: int
    offset: int  # the stream address of the piece's first row
    ref: Any
    lo: int
    hi: int


class Feeder:
    """Deals one dataset's rows to ``workers`` workers (a Ray actor, one per
    worker group; see the module doc). Nothing is dealt before :meth:`start`
    says where to begin.

    Args:
        dataset: The ``ray.data.Dataset``.
        workers: The group's worker count.
        batch_size: Rows per batch (per worker).
        label: The label column (for :meth:`sample`).
        ref: The config's ``ray_dataset`` (for messages).
    """

    def __init__(self, dataset, workers: int, batch_size: int, label: str, ref: str):
        import ray.data
        raydata.quiet()
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        self._dataset, self._workers = dataset, workers
        self._batch_size, self._label, self._ref = batch_size, label, ref
        self._chunk_rows = chunk_rows(batch_size)
        self._state = threading.Lock()  # queues, logs, counters
        self._reading = threading.Lock()  # the stream (one reader at a time)
        self._started = threading.Event()
        self._plan = Plan()
        self._queues: list[deque] = [deque() for _ in range(workers)]
        self._logs: list[deque] = [deque() for _ in range(workers)]
        self._dropped_rows = [0] * workers  # rows of chunks trimmed off a log
        self._chunks = 0  # chunks made
        self._cursor: tuple[int, int] | None = None  # after the last regular chunk
        self._pieces: Iterator[_Piece] | None = None
        self._carry: _Piece | None = None  # the rest of a piece split by a chunk
        self._failure: DistributedError | None = None
        self._tracking = True

    def sample(self) -> tuple[dict, np.ndarray] | DistributedError:
        """A first batch of the dataset (its spec; never trained on), or the
        error reading it raised (returned: the worker raises it as is)."""
        try:
            with user_code(raydata.FIELD, self._ref):
                data = self._dataset.limit(self._batch_size)
                for batch in raydata.epoch_batches(data, self._batch_size, self._label,
                                                   self._ref, drop_last=False):
                    return batch
            raise ConfigError(f"{raydata.FIELD}: the dataset of {self._ref} has no "
                              "rows; check the path or query it reads")
        except DistributedError as e:
            return e

    def start(self, position: bytes | None, tracking: bool = True) -> str | None:
        """Begins dealing: from the plan of a saved position, or (``None``)
        from the first row. ``tracking``: keep what was dealt to whom, for
        :meth:`position` (off under ``input_position: restart``). Returns what
        the resume does, for the job's log."""
        self._tracking = tracking
        plan = Plan.decode(position) if position else None
        note = None
        if position and plan is None:
            note = ("the checkpoint's input position is not a Ray Data input's, so the "
                    "Ray Data input starts from its first row")
        elif plan is not None:
            note = (f"the Ray Data input resumes at {plan.describe()}, dealt over "
                    f"{self._workers} worker(s)")
        self._plan = plan or Plan()
        self._pieces = self._read(self._plan)
        self._started.set()
        return note

    def next(self, rank: int) -> Chunk | DistributedError:
        """Worker ``rank``'s next chunk (or the error reading the dataset
        raised, for the worker to raise)."""
        self._started.wait()
        while True:
            with self._state:
                if self._queues[rank]:
                    return self._queues[rank].popleft()
                if self._failure is not None:
                    return self._failure
            with self._reading:
                with self._state:
                    if self._queues[rank] or self._failure is not None:
                        continue
                try:
                    chunk = self._make_chunk()
                except DistributedError as e:
                    with self._state:
                        self._failure = e
                    continue
                with self._state:
                    owner = (chunk.tail if chunk.tail is not None else
                             chunk.index - len(self._plan.tails)) % self._workers
                    self._queues[owner].append(chunk)
                    if self._tracking:  # without its refs: the log keeps no block
                        self._logs[owner].append(Chunk(chunk.index, [], chunk.ranges,
                                                       chunk.rows, chunk.tail))

    def position(self, batches: int) -> bytes:
        """The plan of what is left after every worker trained on its first
        ``batches`` batches of this group (all workers run the same steps).

        Every chunk the workers have not finished (partly trained on, or
        dealt before one that was) keeps its untrained rows as a tail, in
        chunk order; from the first chunk after which none was touched, the
        plan goes on as this group's did.
        """
        trained = batches * self._batch_size
        with self._state:
            partial: dict[int, list] = {}  # chunk index -> untrained ranges
            touched = -1  # the last chunk index any worker trained on
            for rank, chunks in enumerate(self._logs):
                done = self._dropped_rows[rank]
                for chunk in chunks:
                    if done >= trained:
                        partial[chunk.index] = list(chunk.ranges)
                    elif done + chunk.rows > trained:
                        partial[chunk.index] = _skip(chunk.ranges, trained - done)
                        touched = max(touched, chunk.index)
                    else:
                        touched = max(touched, chunk.index)
                    done += chunk.rows
                self._trim(rank, trained)
            first_untouched = touched + 1
            tails = [tuple(partial[i]) for i in sorted(partial) if i < first_untouched]
            chunk_j = self._find(first_untouched)
            plan_tails = len(self._plan.tails)
            if chunk_j is not None and chunk_j.tail is not None:
                tails += list(self._plan.tails[chunk_j.tail:])
                next_ = self._plan.next
            elif chunk_j is not None:
                next_ = (chunk_j.ranges[0][0], chunk_j.ranges[0][1])
            else:
                used = min(self._chunks, plan_tails)
                tails += list(self._plan.tails[used:])
                next_ = self._cursor if self._cursor is not None else self._plan.next
        return Plan(tuple(t for t in tails if t), next_).encode()

    def _find(self, index: int) -> Chunk | None:
        for chunks in self._logs:
            for chunk in chunks:
                if chunk.index == index:
                    return chunk
        return None

    def _trim(self, rank: int, trained: int) -> None:
        """Forgets the chunks ``rank`` finished before the newest of them
        (later positions count more batches, never fewer)."""
        chunks = self._logs[rank]
        while len(chunks) > 1 and self._dropped_rows[rank] + chunks[0].rows \
                + chunks[1].rows <= trained:
            self._dropped_rows[rank] += chunks.popleft().rows

    def _make_chunk(self) -> Chunk:
        plan = self._plan
        tail = self._chunks if self._chunks < len(plan.tails) else None
        rows = (sum(hi - lo for _, lo, hi in plan.tails[tail]) if tail is not None
                else self._chunk_rows)
        chunk = Chunk(index=self._chunks, tail=tail)
        while chunk.rows < rows:
            piece = self._carry if self._carry is not None else self._next_piece()
            self._carry = None
            take = min(piece.hi - piece.lo, rows - chunk.rows)
            if take < piece.hi - piece.lo:
                self._carry = _Piece(piece.epoch, piece.offset + take, piece.ref,
                                     piece.lo + take, piece.hi)
            chunk.pieces.append((piece.ref, piece.lo, piece.lo + take))
            _append(chunk.ranges, piece.epoch, piece.offset, piece.offset + take)
            chunk.rows += take
        self._chunks += 1
        if tail is None:
            epoch, _, end = chunk.ranges[-1]
            self._cursor = (epoch, end)
        return chunk

    def _next_piece(self) -> _Piece:
        with user_code(raydata.FIELD, self._ref):
            return next(self._pieces)

    def _read(self, plan: Plan) -> Iterator[_Piece]:
        """The plan's rows in stream order, as pieces of the dataset's blocks;
        an epoch is read only where the plan wants rows of it, and rows it
        does not want are passed over by their blocks' row counts (no fetch)."""
        tails: dict[int, list[tuple[int, int]]] = {}
        for tail in plan.tails:
            for epoch, lo, hi in tail:
                tails.setdefault(epoch, []).append((lo, hi))
        start_epoch, start_offset = plan.next
        epoch = min([start_epoch, *tails])
        while True:
            wanted = sorted(tails.get(epoch, []))
            if epoch == start_epoch:
                wanted.append((start_offset, float("inf")))
            elif epoch > start_epoch:
                wanted = [(0, float("inf"))]
            if not wanted:
                epoch += 1
                continue
            last = max(hi for _, hi in wanted)
            offset = 0
            if epoch < start_epoch and tails.get(epoch):
                log.info("input %s: reading epoch %d again for %d rows the "
                         "checkpoint's workers had not trained on", self._ref, epoch,
                         sum(hi - lo for lo, hi in wanted))
            for ref, first, rows in _blocks(self._dataset):
                for lo, hi in wanted:
                    a, b = max(lo, offset), min(hi, offset + rows)
                    if a < b:
                        yield _Piece(epoch, a, ref, first + a - offset, first + b - offset)
                offset += rows
                if offset >= last:
                    break
            if offset == 0:
                raise ConfigError(f"{raydata.FIELD}: the dataset of {self._ref} has no "
                                  "rows; check the path or query it reads")
            epoch += 1


def _blocks(dataset) -> Iterator[tuple[Any, int, int]]:
    """``(block ref, first row, rows)`` of one pass over the dataset, in order."""
    for bundle in dataset.iter_internal_ref_bundles():
        slices = bundle.slices or [None] * len(bundle.block_refs)
        for ref, meta, cut in zip(bundle.block_refs, bundle.metadata, slices):
            if cut is not None:
                yield ref, cut.start_offset, cut.end_offset - cut.start_offset
            elif meta.num_rows:
                yield ref, 0, meta.num_rows


def _append(ranges: list, epoch: int, lo: int, hi: int) -> None:
    if ranges and ranges[-1][0] == epoch and ranges[-1][2] == lo:
        ranges[-1] = (epoch, ranges[-1][1], hi)
    else:
        ranges.append((epoch, lo, hi))


def _skip(ranges: list, rows: int) -> list:
    """``ranges`` without their first ``rows`` rows."""
    out = []
    for epoch, lo, hi in ranges:
        if rows >= hi - lo:
            rows -= hi - lo
            continue
        out.append((epoch, lo + rows, hi))
        rows = 0
    return out


def start_feeder(dataset, workers: int, batch_size: int, label: str, ref: str):
    """The group's :class:`Feeder` actor (no CPU of its own: the dataset's
    read tasks take theirs)."""
    import ray
    actor = ray.remote(num_cpus=0, max_concurrency=workers + 4)(Feeder)
    return actor.remote(dataset, workers, batch_size, label, ref)


def feed_batches(feeder, rank: int, batch_size: int, label: str,
                 ref: str) -> Iterator[tuple[dict, np.ndarray]]:
    """Worker ``rank``'s batches: its chunks' rows, fetched block by block
    and cut into batches (a batch may span chunks and epochs)."""
    import ray
    from ray.data.block import BlockAccessor
    pending = feeder.next.remote(rank)
    held: dict[str, list] = {}  # column -> arrays not yet batched
    rows = 0
    cache: tuple[Any, Any] | None = None  # the last block fetched
    while True:
        chunk = ray.get(pending)
        if isinstance(chunk, DistributedError):
            raise chunk
        pending = feeder.next.remote(rank)
        for block_ref, lo, hi in chunk.pieces:
            if cache is None or cache[0] != block_ref:
                cache = (block_ref, ray.get(block_ref))
            part = BlockAccessor.for_block(cache[1]).slice(lo, hi, copy=False)
            columns = BlockAccessor.for_block(part).to_batch_format("numpy")
            for name, values in columns.items():
                held.setdefault(name, []).append(values)
            rows += hi - lo
            while rows >= batch_size:
                batch = {}
                for name, parts in held.items():
                    joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
                    batch[name], held[name] = joined[:batch_size], [joined[batch_size:]]
                rows -= batch_size
                labels = raydata.column(batch.pop(label), label, ref)
                yield {k: raydata.column(v, k, ref) for k, v in batch.items()}, labels


class RayDataSource(PythonSource):
    """A worker's Ray Data input: its chunks of the group's stream, read
    ahead on a thread like any Python input. Its position is the feeder's:
    rank 0's holds the group's plan (:meth:`Feeder.position`), the others'
    only their count of batches; a resume starts the feeder from the plan
    (the driver does, before any worker reads), so nothing is replayed here.

    Args:
        feeder: The group's :class:`Feeder` actor.
        config: The run's config.
        rank: This worker's index.
    """

    kind = KIND

    def __init__(self, feeder, config, rank: int):
        import ray
        sample = ray.get(feeder.sample.remote())
        if isinstance(sample, DistributedError):
            raise sample
        super().__init__(
            feed_batches(feeder, rank, config.batch_size, config.input_label,
                         config.input_ref),
            config.input_ref, raydata.FIELD, rank, prefetch=config.input_prefetch,
            spec_batch=sample)
        self._feeder = feeder

    def position(self, sess=None) -> bytes:
        import ray
        if self.rank == 0:
            return ray.get(self._feeder.position.remote(self.consumed))
        return json.dumps({"kind": "ray_data_worker",
                           "consumed_batches": self.consumed}).encode()

    def restore_position(self, sess, position: bytes) -> None:
        """Nothing to do: the feeder started from the checkpoint's plan."""


def check_order(dataset, ref: str) -> None:
    """Refuses (under ``input_position: exact``) a dataset whose rows come in
    another order each time it is read: a resume could not find where it
    stood. Checks the plan's shuffles; other sources of disorder (a read of
    files that change) are the user's to avoid."""
    try:
        ops = _logical_ops(dataset._logical_plan.dag)
    except AttributeError:  # another Ray Data version: nothing to check
        return
    for op in ops:
        name = type(op).__name__
        seeds = getattr(op, "seed_config", None)
        if name not in ("RandomShuffle", "RandomizeBlocks") or seeds is None:
            continue
        what = ("random_shuffle()" if name == "RandomShuffle" else
                "randomize_block_order()")
        if getattr(seeds, "seed", 0) is None:
            why = f"calls {what} without a seed"
        elif getattr(seeds, "reseed_after_execution", False):
            why = f"reseeds {what} on every read"
        else:
            continue
        raise ConfigError(
            f"input_position: the dataset of {ref} {why}, so its rows come in "
            "another order each time it is read and a resume cannot find where it "
            "stood; pass a fixed seed=, or set input_position: restart (a resume then "
            "starts a new epoch)")


def _logical_ops(op) -> list:
    out, todo = [], [op]
    while todo:
        op = todo.pop()
        out.append(op)
        todo.extend(getattr(op, "input_dependencies", []) or [])
    return out
