"""Workflows that tie the pipeline to files and folders: what the CLI and the demo call.

Each function takes paths and plain values, runs select / train / extract / apply through the
public API, and returns a result object; the CLI only parses arguments and prints.
"""

from .bound import diagnose_for_task
from .deltas import apply_to_pretrained, extract_from_pretrained, merge_delta_files
from .masks import save_mask_for_task
from .subspace import (
    SubspaceTrainReport,
    fit_subspace_files,
    subspace_landscape,
    train_in_subspace,
)

__all__ = [
    "SubspaceTrainReport",
    "apply_to_pretrained",
    "diagnose_for_task",
    "extract_from_pretrained",
    "fit_subspace_files",
    "merge_delta_files",
    "save_mask_for_task",
    "subspace_landscape",
    "train_in_subspace",
]
