"""The kinds of input, each turned into the tensors a worker's model reads.

* :class:`DatasetSource`: the ``input_fn`` returned a ``tf.data.Dataset``. It is
  built inside the worker's graph; the iterator's tensors are the model's
  ``features``/``labels``, so a step feeds nothing from Python.
* :class:`PythonSource`: a Python iterator of numpy batches (a generator
  ``input_fn``, or a Ray Data split). A background thread reads it a few
  batches ahead into a small bounded queue, so the step only waits for Python
  when the data is truly late; each step feeds the next ready batch.

Both have ``spec`` (:class:`InputSpec`), ``tensors()`` (called once, inside the
graph), ``start(sess)`` and ``feed(step)`` (the step's ``feed_dict`` or
``None``). For several steps per ``Session.run`` (an in-graph loop,
``steps_per_run``) they also have ``step_reader()`` (called once, outside the
loop: a function of the loop's counter that gives that step's tensors, called
inside the loop's body) and ``feed_steps(step, n)`` (the feed of ``n`` steps).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from distributed.errors import ConfigError, DistributedError, user_code
from distributed.inputs.spec import InputSpec, step_of

log = logging.getLogger(__name__)


def is_dataset(value: Any) -> bool:
    """Whether ``value`` is a ``tf.data.Dataset`` (without importing TF for
    a plain generator)."""
    import sys
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, tf.data.Dataset)


class DatasetSource:
    """A ``tf.data`` input inside the worker's graph.

    A dataset without a final ``prefetch`` gets ``prefetch(AUTOTUNE)``; on a
    GPU worker the batches are prefetched to the GPU
    (``tf.data.experimental.prefetch_to_device``), so the next batch is
    already there when the step needs it. Not when its position is saved
    (``saves_position``): ``prefetch_to_device`` runs a ``GeneratorDataset``,
    whose state TensorFlow cannot save, so the iterator stays on the CPU
    (prefetching there) and each step copies its batch to the GPU.

    NOTE: construct inside the graph the dataset was built in.
    """

    kind = "tf.data"

    def __init__(self, dataset, ref: str, rank: int, gpu: bool = False,
                 saves_position: bool = False):
        import tensorflow as tf
        self.ref, self.rank = ref, rank
        self.spec = InputSpec.from_element_spec(dataset.element_spec, f"input {ref}")
        if not ends_with_prefetch(dataset):
            dataset = dataset.prefetch(tf.data.AUTOTUNE)
        to_gpu = gpu and not saves_position
        self._device = "/device:GPU:0" if to_gpu else "/device:CPU:0"
        if to_gpu:
            dataset = dataset.apply(
                tf.data.experimental.prefetch_to_device(self._device, buffer_size=2))
        with tf.device(self._device):
            self._iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        # The iterator's own state (position, shuffle and prefetch buffers) as
        # one string: what a full checkpoint keeps of a tf.data input.
        with tf.device("/device:CPU:0"), tf.name_scope("input_position"):
            self._save_position = self._serialize()
            # Fed only to restore; not a Placeholder, so a step feeds nothing.
            self._saved_position = tf.compat.v1.placeholder_with_default("", [])
            self._restore_position = tf.raw_ops.DeserializeIterator(
                resource_handle=self._iterator._iterator_resource,
                serialized=tf.io.parse_tensor(self._saved_position, tf.variant))

    def _serialize(self):
        """The iterator's state as a string tensor. FAIL (2): a pipeline with
        Python state refuses, never saves half of it."""
        import tensorflow as tf
        return tf.io.serialize_tensor(tf.raw_ops.SerializeIterator(
            resource_handle=self._iterator._iterator_resource, external_state_policy=2))

    def position_after(self, tensors: Sequence[Any]):
        """The iterator's state as a tensor to fetch in the run of a step: it
        runs once ``tensors`` (the step's reads of the iterator) are computed,
        beside the rest of the step, and holds nothing of a later step. The
        same bytes :meth:`position` returns between the runs, without a run
        of its own. Build in this source's graph."""
        import tensorflow as tf
        with tf.device("/device:CPU:0"), tf.name_scope("input_position"), \
                tf.control_dependencies(list(tensors)):
            return self._serialize()

    def tensors(self) -> tuple[dict[str, Any], Any]:
        import tensorflow as tf
        with tf.device(self._device):
            features, labels = self._iterator.get_next(name="input")
        return dict(features), labels

    def start(self, sess) -> None:
        sess.run(self._iterator.initializer)

    def feed(self, step: int) -> None:
        return None

    def position(self, sess) -> bytes:
        """The iterator's state now (between runs of steps: nothing of a
        step in flight), for the full checkpoint of this step."""
        return sess.run(self._save_position)

    def restore_position(self, sess, position: bytes) -> None:
        """Sets the iterator to a state :meth:`position` saved."""
        sess.run(self._restore_position, {self._saved_position: position})

    def check_position(self, sess) -> None:
        """Raises :class:`ConfigError` when the pipeline's state cannot be
        saved (Python state: ``from_generator``, ``py_function``; a dataset
        TensorFlow cannot checkpoint), naming the op and the choice the config
        offers."""
        import tensorflow as tf
        try:
            sess.run(self._save_position)
        except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as e:
            lines = e.message.splitlines()
            stateful = next((ln.split(" is stateful")[0].strip() for ln in lines
                             if " is stateful" in ln), None)
            unsaved = next((ln.split(" does not support checkpointing")[0].strip()
                            for ln in lines if " does not support checkpointing" in ln),
                           None)
            if stateful is not None or unsaved is None:
                what = (f"runs {stateful or 'an op'} (Python state, as from_generator "
                        "and py_function have)")
            else:
                what = (f"holds a {unsaved}, whose state TensorFlow cannot save "
                        "(from_generator, prefetch_to_device and copy_to_device make "
                        "one)")
            raise ConfigError(
                f"input_position: the tf.data dataset of {self.ref} {what}, so its "
                "position cannot be saved in checkpoints; build it from tensors or "
                "files (tf.data.Dataset.from_tensor_slices, TFRecordDataset) without "
                "those, or set input_position: restart (a resume then reads the "
                "input again from its beginning)") from None

    def step_reader(self) -> Callable[[Any], tuple[dict[str, Any], Any]]:
        """Each step of an in-graph loop reads the iterator's next batch."""
        return lambda i: self.tensors()

    def feed_steps(self, step: int, n: int) -> None:
        return None

    def fed_names(self) -> set[str]:
        """Placeholders a step feeds: none."""
        return set()

    def ended(self, step: int) -> ConfigError:
        """The error for a dataset that ran out (``OutOfRangeError`` in a step)."""
        return ConfigError(
            f"input: the tf.data dataset of {self.ref} ended on worker {self.rank} "
            f"after step {step}; the run needs batches for every step: add "
            ".repeat() before .batch() in input_fn (or lower steps)")

    def close(self) -> None:
        pass


def ends_with_prefetch(dataset) -> bool:
    """Whether the dataset's last transformation is a prefetch."""
    try:
        return dataset._variant_tensor.op.type == "PrefetchDataset"
    except AttributeError:  # an eager dataset: look at its Python class
        return type(dataset).__name__ == "PrefetchDataset"


_END = object()  # the iterator ended


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class PythonSource:
    """A Python iterator of ``(features dict, labels)`` numpy batches, read on
    a background thread ``prefetch`` batches ahead (0: on the training thread).

    Errors keep the user-code form: the reader thread wraps what the user's
    iterator raises exactly as the training thread would, and the next
    :meth:`feed` raises it.

    Args:
        batches: The iterator; its first batch gives the spec.
        ref: The input's name in messages (the config's reference).
        field: The config field naming the input (``input``, ``input.ray_dataset``).
        rank: This worker's index.
        prefetch: Batches read ahead.
        ended_hint: How to fix an iterator that ends.
        reopen: For an ``input_fn`` that takes ``start_batch``: a new
            iterator from a given batch on, so that a resume reads no batch
            twice (without it, :meth:`restore_position` replays).
        spec_batch: A batch that gives the spec and is not trained on (the
            iterator is then not read before :meth:`start`).
    """

    kind = "python"

    def __init__(self, batches: Iterator, ref: str, field: str, rank: int,
                 prefetch: int = 2,
                 ended_hint: str = "an input function must yield batches forever "
                                   "(loop over the data in epochs)",
                 reopen: Callable[[int], Iterator] | None = None,
                 spec_batch: tuple | None = None):
        self.ref, self.field, self.rank = ref, field, rank
        self._reopen = reopen
        self._ended_hint = ended_hint
        self._iter = iter(batches)
        first = spec_batch
        if first is None:
            with user_code(field, ref):
                first = next(self._iter, _END)
            if first is _END:
                raise ConfigError(f"{field}: {ref} yielded no batch on worker {rank}; "
                                  f"{ended_hint}")
        self.spec = InputSpec.from_batch(*first, f"{field} {ref}")
        self._first = first if spec_batch is None else None
        self._prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._features: dict[str, Any] = {}
        self._labels = None
        self.consumed = 0  # batches the steps took (not those read ahead)

    def tensors(self, stacked: bool = False) -> tuple[dict[str, Any], Any]:
        """The placeholders the batches are fed to; ``stacked``: with a
        leading dimension of steps (see :meth:`step_reader`)."""
        self._features, self._labels = self.spec.placeholders(stacked=stacked)
        self._dtypes = {name: np.dtype(object) if d == "string" else np.dtype(d)
                        for name, (d, _) in self.spec.features.items()}
        d = self.spec.labels[0]
        self._label_dtype = np.dtype(object) if d == "string" else np.dtype(d)
        return dict(self._features), self._labels

    def start(self, sess=None) -> None:
        if self._prefetch > 0 and self._thread is None:
            self._queue = queue.Queue(maxsize=self._prefetch)
            if self._first is not None:
                self._queue.put(self._convert(self._first))
            self._thread = threading.Thread(target=self._fill, daemon=True,
                                            name=f"input-reader-{self.rank}")
            self._thread.start()
        elif self._first is not None:
            self._iter = itertools.chain([self._first], self._iter)
        self._first = None

    def feed(self, step: int) -> dict:
        features, labels = self._next(step)
        feed = {self._features[k]: v for k, v in features.items()}
        feed[self._labels] = labels
        return feed

    def step_reader(self) -> Callable[[Any], tuple[dict[str, Any], Any]]:
        """Stacked placeholders (made here, outside the loop); step ``i`` of a
        run reads their ``i``-th batch."""
        features, labels = self.tensors(stacked=True)
        return lambda i: step_of(features, labels, i)

    def feed_steps(self, step: int, n: int) -> dict:
        """The next ``n`` batches, stacked, for the steps after ``step``. Every
        batch of one run must have the same shape (a partial batch cannot be
        stacked with full ones: the error says so)."""
        batches = [self._next(step + k) for k in range(n)]
        feed = {}
        for name, placeholder in self._features.items():
            feed[placeholder] = self._stack([b[0][name] for b in batches], name)
        feed[self._labels] = self._stack([b[1] for b in batches], "labels")
        return feed

    def fed_names(self) -> set[str]:
        """Names of the placeholders the steps feed."""
        return {t.op.name for t in [*self._features.values(), self._labels]}

    def _stack(self, arrays: list, name: str):
        try:
            return np.stack(arrays)
        except ValueError:
            shapes = sorted({a.shape for a in arrays})
            raise ConfigError(
                f"{self.field}: {self.ref} yielded {name} of shapes {shapes} on worker "
                f"{self.rank} within one run of steps_per_run steps, which are fed "
                "stacked; yield batches of one shape (drop or pad a partial batch) "
                "or set steps_per_run: 1") from None

    def _next(self, step: int):
        """The next converted batch (raising the input's error or its end)."""
        if self._queue is not None:
            item = self._queue.get()
        else:
            item = self._read()
            if item is not _END and not isinstance(item, _Failure):
                item = self._convert(item)
        if item is _END:
            raise ConfigError(
                f"{self.field}: {self.ref} ran out of batches on worker {self.rank} "
                f"after step {step}; {self._ended_hint}")
        if isinstance(item, _Failure):
            raise item.error
        self.consumed += 1
        return item

    def position(self, sess=None) -> bytes:
        """Batches the steps consumed so far (read-ahead batches do not
        count), for the full checkpoint of this step."""
        return json.dumps({"consumed_batches": self.consumed}).encode()

    def restore_position(self, sess, position: bytes) -> None:
        """Goes on after the batches a :meth:`position` counted: reads and
        drops them (a replay; its cost is logged once)."""
        import time
        target = int(json.loads(position)["consumed_batches"])
        if self._reopen is not None and target != self.consumed:
            self._restart_at(target)
            return
        batches = target - self.consumed
        start = time.perf_counter()
        for _ in range(batches):
            self._next(self.consumed)
        if batches > 0:
            log.info("input %s on worker %d: replayed %d batches in %.2f s to reach "
                     "the checkpoint's input position", self.ref, self.rank, batches,
                     time.perf_counter() - start)

    def _restart_at(self, batch: int) -> None:
        """Reads from the input function's iterator from ``batch`` on."""
        self._stop.set()
        if self._thread is not None:
            # The reader may sit in a put on the full queue (0.5 s timeout):
            # empty it so the put returns and the reader sees the stop now.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join()
        with user_code(self.field, self.ref):
            self._iter = iter(self._reopen(batch))
            first = next(self._iter, _END)
        if first is _END:
            raise ConfigError(f"{self.field}: {self.ref} yielded no batch from batch "
                              f"{batch} on worker {self.rank}; {self._ended_hint}")
        self._first, self._thread, self._queue = first, None, None
        self._stop = threading.Event()
        self.consumed = batch
        self.start()
        log.info("input %s on worker %d: resumed at batch %d (start_batch)",
                 self.ref, self.rank, batch)

    def check_position(self, sess=None) -> None:
        """A Python input's position is always saved: a count of batches."""

    def ended(self, step: int) -> ConfigError:
        """The error for an ``OutOfRangeError`` in a step (a dataset the
        model itself reads ended)."""
        return ConfigError(
            f"model: a tf.data iterator the graph reads ended at step {step + 1} on "
            f"worker {self.rank} (OutOfRangeError); repeat() that dataset")

    def close(self) -> None:
        self._stop.set()

    def _read(self):
        """The next batch, ``_END``, or a :class:`_Failure` (never raises)."""
        try:
            with user_code(self.field, self.ref):
                try:
                    return next(self._iter)
                except StopIteration:
                    return _END
        except DistributedError as e:
            return _Failure(e)

    def _convert(self, batch) -> Any:
        """The batch as arrays of the spec's dtypes (off the training thread)."""
        try:
            features, labels = batch
            if not isinstance(features, Mapping) or set(features) != set(self._features):
                names = sorted(features) if isinstance(features, Mapping) else \
                    type(features).__name__
                raise ConfigError(
                    f"{self.field}: {self.ref} yielded features {names} on worker "
                    f"{self.rank}, but its first batch had "
                    f"{sorted(self._features)}; every batch needs the same features")
            out = {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in features.items()}
            return out, np.asarray(labels, dtype=self._label_dtype)
        except DistributedError as e:
            return _Failure(e)
        except (TypeError, ValueError) as e:
            return _Failure(ConfigError(
                f"{self.field}: {self.ref} yielded a batch that does not match its "
                f"first one on worker {self.rank} ({e}); every batch needs the "
                f"spec {self.spec}"))

    def _fill(self) -> None:
        while not self._stop.is_set():
            item = self._read()
            if item is not _END and not isinstance(item, _Failure):
                item = self._convert(item)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if item is _END or isinstance(item, _Failure):
                return


def takes_start_batch(input_fn: Callable) -> bool:
    """Whether ``input_fn`` accepts ``start_batch`` (the resumable protocol:
    it yields its batches from that one on)."""
    import inspect
    try:
        return "start_batch" in inspect.signature(input_fn).parameters
    except (TypeError, ValueError):
        return False


def call_input_fn(input_fn: Callable, ref: str, worker_index: int, num_workers: int,
                  batch_size: int, params: Mapping[str, Any], **start):
    """Calls the user's ``input_fn``: a ``tf.data.Dataset`` or an iterator.
    ``start``: ``start_batch=N`` for an ``input_fn`` that takes it."""
    with user_code("input", ref):
        result = input_fn(worker_index, num_workers, batch_size, dict(params), **start)
        if is_dataset(result):
            return result
        try:
            return iter(result)
        except TypeError:
            pass
    raise ConfigError(
        f"input: {ref} returned {type(result).__name__}; an input_fn returns a "
        "tf.data.Dataset of (features dict, labels) batches or yields "
        "(features dict, labels) numpy batches")


__all__ = ["DatasetSource", "PythonSource", "call_input_fn", "takes_start_batch", "ends_with_prefetch",
           "is_dataset"]
