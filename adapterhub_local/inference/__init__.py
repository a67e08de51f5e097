"""Inference layer: merge/unmerge, per-request adapter selection in mixed batches, generation."""

from adapterhub_local.inference.engine import Engine, Mode
from adapterhub_local.inference.policy import AutoPolicy
from adapterhub_local.inference.types import (
    AdapterInfo,
    ClassificationResult,
    GenerationResult,
    LogitsResult,
    PoolStats,
    Request,
    SamplingParams,
    StreamEvent,
)

__all__ = ["AdapterInfo", "AutoPolicy", "ClassificationResult", "Engine", "GenerationResult", "LogitsResult", "Mode",
           "PoolStats", "Request", "SamplingParams", "StreamEvent"]
