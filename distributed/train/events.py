"""TensorBoard event files, written without the tensorboard package.

An event file is a TFRecord file of ``Event`` protos whose first record names
the format version; TensorBoard (``tensorboard --logdir <storage>/<run>``)
reads it as written here. Writing needs TensorFlow only, so actors do not
depend on tensorboard (``tf.summary`` does).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2


class EventWriter:
    """Appends scalar summaries to a new event file under ``logdir``."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(
            logdir, f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}."
                    f"{os.getpid()}")
        self._writer = tf.io.TFRecordWriter(self.path)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event at ``step`` holding a scalar per tag."""
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary))

    def close(self) -> None:
        self._writer.close()
