"""Task run names: what a run is about, readable in the UI without opening it.

``submit · nanobanana-pro · item-3/round-1``, ``wait · gen_abc · item-3/round-1``: the verb,
then the EggAPI task id (or the model, before there is a task), then the caller's label. Prefect
calls these inside the task run, where :mod:`prefect.runtime` knows the bound parameters.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect.runtime import task_run

from prefect_eggapi.client.types import EggAPITask, GenerateRequest

__all__ = ["request_run_name", "task_run_name"]


def _join(*parts: str) -> str:
    return " · ".join(p for p in parts if p)


def _label() -> str:
    return str((task_run.parameters or {}).get("label") or "")


def task_run_name(verb: str) -> Callable[[], str]:
    """``verb · <task id> · <label>`` for steps about one EggAPI task (its ``task`` parameter)."""

    def name() -> str:
        source = (task_run.parameters or {}).get("task")
        task_id = source.id if isinstance(source, EggAPITask) else str(source or "")
        return _join(verb, task_id, _label())

    name.__name__ = f"{verb}_run_name"
    return name


def request_run_name(verb: str) -> Callable[[], str]:
    """``verb · <model> · <label>`` for steps that start from a request (``request``)."""

    def name() -> str:
        req = (task_run.parameters or {}).get("request")
        return _join(verb, req.model if isinstance(req, GenerateRequest) else "", _label())

    name.__name__ = f"{verb}_run_name"
    return name
