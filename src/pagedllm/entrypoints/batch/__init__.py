"""Offline batch inference: a JSONL file of prompts through N model replicas, exactly once."""

from .backends import BatchError
from .runner import BatchSummary, infer

__all__ = ["BatchError", "BatchSummary", "infer"]
