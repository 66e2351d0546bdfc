"""Turning committed checkpoints into SavedModels for inference servers."""

from distributed.serving.export import (ExportResult, ScopeMap, candidate_checkpoints, export_first_good,
                                        export_checkpoint, load_run_record,
                                        parse_scope_maps)

__all__ = ["ExportResult", "ScopeMap", "candidate_checkpoints", "export_first_good", "export_checkpoint",
           "load_run_record", "parse_scope_maps"]
