"""``python -m distributed.ckpt`` (also installed as ``dtr-ckpt``): the checkpoint
command line. This module is only its entry point; the commands live in
:mod:`distributed.cli.ckpt`, the checkpoint library in :mod:`distributed.checkpoint`.
"""

from distributed.cli.ckpt.cli import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    run()
