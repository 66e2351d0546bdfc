"""Selective, sharded, atomically committed checkpoints with Arrow manifests.

Importing this package does not import TensorFlow; only the writer needs it
(``CheckpointWriter`` and ``session_config`` load it on first use), so catalog
listing and verification stay fast and light.
"""

from distributed.checkpoint.catalog import (CATALOG_SCHEMA, Catalog, CatalogEntry,
                                            CorruptCatalogRowWarning)
from distributed.checkpoint.lease import Lease
from distributed.checkpoint.layout import TIERS, RunLayout
from distributed.checkpoint.manifest import (MANIFEST_SCHEMA, Manifest, TensorRecord,
                                             read_manifest)
from distributed.checkpoint.retention import (KeepBestN, KeepEveryKSteps, KeepLastN,
                                              Retention)
from distributed.checkpoint.selection import (POLICIES, MissingInferenceVariablesWarning,
                                              Selection, SelectionSpec, VariableInfo,
                                              select, select_variables,
                                              variables_read_by)
from distributed.checkpoint.store import PHASES, CheckpointStore
from distributed.checkpoint.verify import VerifyReport, verify_checkpoint

__all__ = [
    "CATALOG_SCHEMA", "Catalog", "CatalogEntry", "CheckpointStore",
    "CheckpointWriter", "CorruptCatalogRowWarning", "KeepBestN", "KeepEveryKSteps",
    "KeepLastN", "Lease",
    "MANIFEST_SCHEMA", "Manifest", "MissingInferenceVariablesWarning", "PHASES",
    "POLICIES", "Retention", "RunLayout", "Selection", "SelectionSpec", "TIERS",
    "TensorRecord", "VariableInfo", "VerifyReport", "read_manifest", "select",
    "select_variables", "session_config", "variables_read_by", "verify_checkpoint",
]


def __getattr__(name):
    if name in ("CheckpointWriter", "session_config"):
        from distributed.checkpoint import writer
        return getattr(writer, name)
    raise AttributeError(name)
