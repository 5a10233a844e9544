"""Workflows that tie the pipeline to files and folders: what the CLI and the demo call.

Each function takes paths and plain values, runs select / train / extract / apply through the
public API, and returns a result object; the CLI only parses arguments and prints.
"""

from .pretrained import apply_to_pretrained, extract_from_pretrained

__all__ = ["apply_to_pretrained", "extract_from_pretrained"]
