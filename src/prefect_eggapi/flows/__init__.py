"""Ready-made Prefect flows (the example files under ``flows/`` import them from here)."""

from __future__ import annotations

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

__all__ = [
    "DEFAULT_EDIT_INSTRUCTIONS",
    "ItemRecord",
    "PipelineError",
    "PipelineParams",
    "PipelineSummary",
    "image_pipeline",
    "manifest_key",
    "run_pipeline",
]
