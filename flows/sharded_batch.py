"""Example: one big manifest spread over every worker of a pool, crashed shards run again.

The parent flow splits the manifest into ``shards`` line ranges and starts each as a flow run
of the ``eggapi-batch/batch-shard`` deployment (``batch_generate`` with ``lines="a:b"``), so any
worker of the pool takes any shard. A shard whose worker dies (Crashed, or Running with no
heartbeat for ``stale_after`` seconds) runs again; nothing is paid twice, because a shard uses
the whole manifest's run key and item keys. The parent then writes one
``s3://$EGGAPI_S3_BUCKET/$EGGAPI_S3_PREFIX/batches/{run_key}/status.jsonl`` from the per-item
status objects: every line exactly once.

Needs a Prefect server and the deployments (see deployments/README.md)::

    prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
    prefect worker start --pool eggapi-process          # as many as you like
    prefect deployment run 'eggapi-sharded-batch/sharded-batch' \\
        --params '{"manifest": "s3://my-bucket/prompts/big.jsonl", "shards": 8}'
"""

from __future__ import annotations

import asyncio
import sys

from prefect_eggapi.flows import ShardedSummary, sharded_batch_generate

__all__ = ["sharded_batch_generate"]


def main(manifest: str, shards: int = 4) -> ShardedSummary:
    summary: ShardedSummary = asyncio.run(sharded_batch_generate(manifest=manifest, shards=shards))
    print(summary.model_dump_json(indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "prompts.jsonl")
