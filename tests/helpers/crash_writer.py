"""Test helper run as a subprocess: commit step 1, then SIGKILL itself while
committing step 2, at the protocol phase named on the command line."""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from distributed.checkpoint import (CheckpointStore, CheckpointWriter,  # noqa: E402
                                    SelectionSpec, select_variables)
from tests.conftest import build_tiny_model  # noqa: E402


def main(storage: str, phase: str) -> None:
    model = build_tiny_model()
    variables, _ = select_variables(model.graph, SelectionSpec("all"))
    writer = CheckpointWriter(variables, num_shards=2)
    CheckpointStore(storage, "run").open()
    CheckpointStore(storage, "run").save(writer, model.sess, 1, "serving", "{}")

    def die(name):
        if name == phase:
            os.kill(os.getpid(), signal.SIGKILL)

    store = CheckpointStore(storage, "run", on_phase=die)
    store.save(writer, model.sess, 2, "serving", "{}")
    print("not killed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
