"""Example: chain work on ``eggapi.task.completed`` — a follow-up flow run per finished task.

The webhook receiver (``prefect-eggapi webhooks``) and the wait tasks emit
``eggapi.task.completed`` with resource ``eggapi.task.<task id>``. The deployment trigger in
``deployments/chaining.yaml`` starts this flow with ``task_id`` taken from the event. The flow
re-reads the task with ``GET /v1/tasks/{id}`` (events are hints, like webhooks) and publishes a
small summary; put your own next step (persist, notify, edit round) where marked.

Both the receiver and a waiting flow may announce the same completion; the trigger runs at most
once per task within its window, and this flow is safe to run twice anyway (it only reads).

Serve it locally with the trigger (a Prefect server must run the triggers service: ``prefect
server start``, or the ephemeral/test server)::

    python flows/follow_up.py
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import DeploymentEventTrigger

from prefect_eggapi.credentials import EggAPICredentials
from prefect_eggapi.tasks.artifacts import artifact_key

CHAINING_FILE = Path(__file__).resolve().parent.parent / "deployments" / "chaining.yaml"


@flow(name="eggapi-follow-up", log_prints=False)
def follow_up(task_id: str, event_id: str | None = None) -> dict[str, object]:
    """Re-read the finished EggAPI task and report it (replace with your own next step)."""
    logger = get_run_logger()
    with EggAPICredentials().get_client() as client:
        task = client.get_task(task_id)
    urls = task.output.all_urls if task.output else []
    logger.info("EggAPI task %s is %s with %d output(s)", task.id, task.status.value, len(urls))
    # --- your next step here: persist to S3, notify, start an edit round, ...
    summary: dict[str, object] = {
        "task_id": task.id,
        "status": task.status.value,
        "urls": urls,
        "cost": task.cost,
        "event_id": event_id,
    }
    try:
        create_markdown_artifact(
            key=artifact_key("eggapi-follow-up", task.id),
            markdown="\n".join([f"EggAPI task `{task.id}`: **{task.status.value}**", *urls]),
        )
    except Exception:  # artifacts are a nicety
        logger.debug("could not publish the follow-up artifact", exc_info=True)
    return summary


def chaining_triggers(path: Path = CHAINING_FILE) -> list[DeploymentEventTrigger]:
    """The deployment triggers declared for ``eggapi-follow-up`` in ``chaining.yaml``."""
    spec = yaml.safe_load(path.read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "eggapi-follow-up"]
    return [DeploymentEventTrigger(**trigger) for trigger in deployment["triggers"]]


if __name__ == "__main__":
    follow_up.serve(name="eggapi-follow-up", triggers=chaining_triggers())
