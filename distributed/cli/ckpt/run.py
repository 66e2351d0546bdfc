"""Which checkpoint a command-line step names.

Opening the run itself (an unknown run, a bad name, a mistyped ``--storage``:
one clear error, nothing created) is
:func:`~distributed.storage.runstore.open_reader`'s.
"""

from __future__ import annotations

from distributed.checkpoint import layout
from distributed.checkpoint.catalog import Catalog


def resolve_tier(catalog: Catalog, step: int, tier: str | None) -> str:
    """``tier``, or when it is ``None`` the tier that has ``step`` committed
    (``serving`` first); ``serving`` when neither has, so the lookup that
    follows reports the step as not committed."""
    if tier is not None:
        return tier
    keys = catalog.committed_keys()
    return next((t for t in layout.TIERS if (step, t) in keys), layout.TIERS[0])
