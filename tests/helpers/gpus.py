"""Whether this machine has GPUs for the GPU tests, which skip themselves
where there are none."""

import os
import shutil
import subprocess
import sys


def gpus_visible() -> int:
    """How many GPUs TensorFlow sees, asked in a fresh process so the test
    process never initializes CUDA (0 without ``nvidia-smi``)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    probe = ("import tensorflow as tf; "
             "print(len(tf.config.list_physical_devices('GPU')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0
