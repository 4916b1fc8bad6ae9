"""Example: an EggAPI image pipeline — prompts → generate → edit rounds → your S3 bucket.

What it does, per run:

1. makes ``count`` prompts from templates × subjects × styles (deterministic for a ``seed``;
   pass ``prompts=[...]`` or ``prompt_source="my_module:my_llm_prompts"`` to plug in your own);
2. generates one image per prompt (at most ``concurrency`` in flight), then runs one edit round
   per entry of ``edit_instructions``, each editing the previous round's image;
3. streams every image into ``s3://$EGGAPI_S3_BUCKET/$EGGAPI_S3_PREFIX/{task_id}/0.png`` with
   sha256 / size / pixel size / cost metadata, and writes a manifest per run to
   ``.../manifests/{run_key}.json``;
4. publishes a cost table and image artifacts in the Prefect UI.

Rerunning with the same parameters pays nothing and writes nothing new: every paid step has a
logical key ``{run_key}/item-{i}/round-{r}`` recorded in the submission ledger (``.eggapi/``).

Run it locally against the emulator and a local S3 server::

    prefect-eggapi stack            # in one shell; copy the export lines into another shell
    python flows/image_pipeline.py  # in the other one

or against the real service — configuration only::

    export EGGAPI_API_KEY=egg_sk_...              # or an EggAPICredentials block
    export EGGAPI_S3_BUCKET=my-bucket AWS_PROFILE=...
    python flows/image_pipeline.py

Deploy it on a schedule: see ``deployments/README.md`` (entrypoint
``flows/image_pipeline.py:image_pipeline``).
"""

from __future__ import annotations

import asyncio

from prefect_eggapi.flows import PipelineSummary, image_pipeline

__all__ = ["image_pipeline"]


def main() -> PipelineSummary:
    summary: PipelineSummary = asyncio.run(
        image_pipeline(
            model="nanobanana-pro",
            resolution="1k",
            aspect_ratio="16:9",
            count=3,
            seed=7,
            edit_instructions=[
                "turn the scene to night with warm window lights",
                "add gently falling snow",
            ],
            concurrency=4,
            budget=1.00,
        )
    )
    return summary


if __name__ == "__main__":
    result = main()
    for uri in result.images:
        print(uri)
    print(f"manifest: {result.manifest_uri}")
    print(f"total cost: ${result.total_cost} (new this run: ${result.new_cost})")
