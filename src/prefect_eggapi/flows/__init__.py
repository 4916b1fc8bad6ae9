"""Ready-made Prefect flows (the example files under ``flows/`` import them from here)."""

from __future__ import annotations

from prefect_eggapi.flows.batch import BatchParams, BatchSummary, batch_generate, run_batch
from prefect_eggapi.flows.pipeline import (
    DEFAULT_EDIT_INSTRUCTIONS,
    ItemRecord,
    PipelineError,
    PipelineParams,
    PipelineSummary,
    image_pipeline,
    manifest_key,
    run_pipeline,
)
from prefect_eggapi.flows.recovery import RecoverySummary, recover_outputs
from prefect_eggapi.flows.sharded import ShardedSummary, run_sharded, sharded_batch_generate

__all__ = [
    "DEFAULT_EDIT_INSTRUCTIONS",
    "BatchParams",
    "BatchSummary",
    "ItemRecord",
    "PipelineError",
    "PipelineParams",
    "PipelineSummary",
    "RecoverySummary",
    "ShardedSummary",
    "batch_generate",
    "image_pipeline",
    "manifest_key",
    "recover_outputs",
    "run_batch",
    "run_pipeline",
    "run_sharded",
    "sharded_batch_generate",
]
