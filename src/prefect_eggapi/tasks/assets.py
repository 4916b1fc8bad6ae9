"""Stored images as materialized Prefect assets, so the UI shows the edit chain.

Each image is an asset keyed by its ``s3://`` URI; the images an edit was made from are its
upstream assets. The keys are only known once the outputs are stored (the extension comes from
the bytes), so the materializing task is built per call with :func:`prefect.assets.materialize`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE

from prefect_eggapi.client.types import EggAPITask
from prefect_eggapi.storage import StoredImage

__all__ = ["amaterialize_images"]

_ASSET_PROMPT_CHARS = 300
_log = logging.getLogger(__name__)

#: What one image's materialization records (Prefect stores it as JSON).
AssetMetadata = dict[str, str | int | list[str] | None]


def _asset_metadata(
    image: StoredImage,
    task: EggAPITask,
    prompt: str,
    sources: Sequence[str],
    extra: Mapping[str, str],
) -> AssetMetadata:
    return {
        "prompt": prompt[:_ASSET_PROMPT_CHARS],
        "model": task.model or "",
        "task_id": task.id,
        "cost": str(task.cost_amount),
        "sha256": image.sha256,
        "size": image.size,
        "width": image.width,
        "height": image.height,
        "content_type": image.content_type,
        "sources": list(sources),
        **extra,
    }


def _image_asset(image: StoredImage, label: str, prompt: str) -> Asset:
    return Asset(
        key=image.uri,
        properties=AssetProperties(
            name=" · ".join(p for p in (label, image.key.rsplit("/", 2)[-2]) if p),
            description=prompt[:_ASSET_PROMPT_CHARS] or None,
        ),
    )


async def amaterialize_images(
    stored: Sequence[StoredImage],
    task: EggAPITask,
    *,
    sources: Sequence[str] = (),
    prompt: str = "",
    label: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bool:
    """Record the stored images of ``task`` as materialized Prefect assets (one task run).

    ``sources`` are the ``s3://`` URIs of the images an edit was made from. Prompt, model, task
    id and cost go in as materialization metadata. Telemetry: never raises; returns whether the
    materialization was recorded.
    """
    extra = dict(metadata or {})
    upstream = list(dict.fromkeys(sources))
    try:
        assets = [_image_asset(s, label or "", prompt) for s in stored]

        async def record() -> int:
            for image in stored:
                add_asset_metadata(image.uri, _asset_metadata(image, task, prompt, upstream, extra))
            return len(stored)

        materializing = materialize(
            *assets,
            asset_deps=[*upstream] or None,
            name="eggapi-image-asset",
            task_run_name=" · ".join(p for p in ("asset", task.id, label or "") if p),
            cache_policy=NO_CACHE,
            persist_result=False,
        )(record)
        await materializing()
    except Exception:
        _log.debug("could not record assets of EggAPI task %s", task.id, exc_info=True)
        return False
    return True
