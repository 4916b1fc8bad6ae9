"""Example: generate one image set per line of a manifest — thousands of prompts, resumable.

The manifest is JSONL or CSV (a local path or ``s3://bucket/key``); each line has a ``prompt``
and optionally ``id``, ``model``, ``negative_prompt``, ``aspect_ratio``, ``resolution``,
``num_outputs`` and ``image_urls``::

    {"id": "fox-1", "prompt": "a red fox in fresh snow, golden hour"}
    {"id": "owl-1", "prompt": "a snowy owl on a fence post", "model": "nanobanana-pro"}

Broken lines are reported (with their line number and reason) and skipped; every line ends up in
``s3://$EGGAPI_S3_BUCKET/$EGGAPI_S3_PREFIX/batches/{run_key}/status.jsonl``. Kill it and run it
again: finished items are skipped, submitted ones are reconnected, nothing is paid twice.

    prefect-eggapi stack                                   # one shell: the local stack
    python flows/batch_generate.py prompts.jsonl           # another shell, after the exports

Many workers: ``EGGAPI_LEDGER_URI=s3://bucket/ledger`` (a ledger all workers share) and a Prefect
global rate limit (``prefect_eggapi.tasks.global_limit.ensure_global_rate_limit``) passed as
``global_rate_limit``. One manifest over many workers: ``flows/sharded_batch.py`` runs line
ranges of it (``lines="start:stop"``) as flow runs of the ``eggapi-batch/batch-shard`` deployment.
"""

from __future__ import annotations

import asyncio
import sys

from prefect_eggapi.flows import BatchSummary, batch_generate

__all__ = ["batch_generate"]


def main(manifest: str) -> BatchSummary:
    summary: BatchSummary = asyncio.run(batch_generate(manifest=manifest, concurrency=16))
    print(summary.model_dump_json(indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "prompts.jsonl")
