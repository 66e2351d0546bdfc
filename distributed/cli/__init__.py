"""Command-line plumbing shared by the entry points: argument types, the
process guard (``main_guard``: one-line errors, exit codes, SIGTERM), and the
checkpoint CLI (:mod:`distributed.cli.ckpt`). Nothing here is imported by the
library packages; the entry points in ``jobs/`` and ``python -m distributed.ckpt``
use it."""
