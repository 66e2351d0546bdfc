"""``python -m distributed.ckpt``; see :mod:`distributed.ckpt.cli`."""

from distributed.ckpt.cli import run

run()
