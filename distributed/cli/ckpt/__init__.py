"""``python -m distributed.ckpt``: a command line for one run's checkpoints.

``ls``, ``show``, ``verify`` and ``diff`` only read (``verify`` and ``diff``
under reader leases); ``gc`` applies retention and removes leftovers, and must
not run while the run trains. No subcommand imports TensorFlow. See
:mod:`distributed.cli.ckpt.cli` for usage.
"""

from distributed.cli.ckpt.cli import main

__all__ = ["main"]
