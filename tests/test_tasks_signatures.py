"""The tasks' parameters: one signature per sync/async pair, credentials in one place.

Each pair is built from one arguments record (``prefect_eggapi.tasks.twins``); Prefect binds
calls, ``.submit`` and ``.map`` against that signature, and task run names read the bound
parameters. These tests need no EggAPI: the last ones run toy twins under the Prefect harness.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import KW_ONLY, dataclass

import pytest
from prefect import flow, task
from prefect.exceptions import ParameterBindError
from prefect.runtime import task_run
from prefect.tasks import Task
from prefect.utilities.callables import get_call_parameters

import prefect_eggapi.tasks as tasks
from prefect_eggapi.client import DEFAULT_WAIT_TIMEOUT
from prefect_eggapi.client.types import GenerateRequest
from prefect_eggapi.tasks.twins import twin_tasks

PAIRS = [
    ("submit_generation", "asubmit_generation", "eggapi-submit-generation"),
    ("submit_edit", "asubmit_edit", "eggapi-submit-edit"),
    ("wait_for_task", "await_for_task", "eggapi-wait"),
    ("download_outputs", "adownload_outputs", "eggapi-download-outputs"),
    ("generate_image", "agenerate_image", "eggapi-generate-image"),
]
PUBLIC_TASKS = [
    (name, obj) for name in tasks.__all__ if isinstance(obj := getattr(tasks, name), Task)
]


def credentials_out_of_place(t: Task[..., object]) -> str | None:
    """Why ``t`` breaks the rule "credentials is the first keyword-only parameter, default
    None", or None when it keeps it."""
    params = inspect.signature(t.fn).parameters.values()
    keyword_only = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if not keyword_only:
        return "no keyword-only parameters"
    first = keyword_only[0]
    if first.name != "credentials":
        return f"first keyword-only parameter is {first.name!r}"
    if first.default is not None:
        return f"credentials defaults to {first.default!r}"
    return None


def test_every_public_task_is_listed():
    assert sorted(n for n, _ in PUBLIC_TASKS) == sorted(n for pair in PAIRS for n in pair[:2])


@pytest.mark.parametrize(("name", "t"), PUBLIC_TASKS, ids=[n for n, _ in PUBLIC_TASKS])
def test_credentials_is_the_first_keyword_only_parameter(name, t):
    assert credentials_out_of_place(t) is None


def test_the_credentials_check_can_fail():
    @task
    def positional(credentials=None, *, key=None): ...

    @task
    def second(*, key=None, credentials=None): ...

    @task
    def required(*, credentials): ...

    @task
    def none(credentials=None): ...

    assert credentials_out_of_place(positional) == "first keyword-only parameter is 'key'"
    assert credentials_out_of_place(second) == "first keyword-only parameter is 'key'"
    assert "defaults to" in (credentials_out_of_place(required) or "")
    assert credentials_out_of_place(none) == "no keyword-only parameters"


@pytest.mark.parametrize(("sync", "async_", "registered"), PAIRS, ids=[p[0] for p in PAIRS])
def test_a_pair_shares_one_signature_and_one_name(sync, async_, registered):
    s, a = getattr(tasks, sync), getattr(tasks, async_)
    assert inspect.signature(s.fn) == inspect.signature(a.fn)
    assert not s.isasync and a.isasync
    assert s.name == a.name == registered
    assert s.fn.__name__ == sync and a.fn.__name__ == async_
    assert s.description and a.description and s.description != a.description
    # The signature is a real one, not (*args, **kwargs): Prefect binds against it.
    kinds = {p.kind for p in inspect.signature(s.fn).parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.signature(s.fn).return_annotation is not inspect.Signature.empty


def test_prefect_binds_calls_against_the_shared_signature():
    req = GenerateRequest(model="nanobanana", prompt="p")
    bound = get_call_parameters(tasks.agenerate_image.fn, (req,), {"label": "x"})
    assert bound["request"] is req and bound["label"] == "x" and bound["store"] is None
    assert bound["timeout"] == DEFAULT_WAIT_TIMEOUT  # the client's default, one of them
    assert inspect.signature(tasks.wait_for_task.fn).parameters["timeout"].default == (
        DEFAULT_WAIT_TIMEOUT
    )
    with pytest.raises(ParameterBindError):
        get_call_parameters(tasks.asubmit_generation.fn, (req,), {"lable": "typo"})
    with pytest.raises(ParameterBindError):  # keyword-only stays keyword-only
        get_call_parameters(tasks.submit_generation.fn, (req, None), {})


@dataclass(frozen=True)
class ToyArgs:
    request: str
    _: KW_ONLY
    credentials: object = None
    label: str | None = None
    times: int = 1


def _toy(args: ToyArgs) -> str:
    return f"{args.request}*{args.times}:{args.label}"


def _toy_name() -> str:
    return f"toy · {task_run.parameters.get('label')}"


def test_twins_run_submit_and_map_with_keywords(prefect_harness):
    sync, async_ = twin_tasks(
        ToyArgs,
        _toy,
        name="toy",
        names=("toy", "atoy"),
        docs=("Toy.", "Async toy."),
        task_run_name=_toy_name,
    )

    @flow
    def sync_flow() -> list[str]:
        out = [sync("a", label="call"), sync.submit("b", label="submit", times=2).result()]
        return out + [f.result() for f in sync.map(["c", "d"], label="map", times=3)]

    @flow
    async def async_flow() -> list[object]:
        out: list[object] = [await async_("a", label="call")]
        out.append(async_.submit("b", label="submit", times=2).result())
        out += [f.result() for f in async_.map(["c", "d"], label="map", times=3)]
        out += [f.result() for f in async_.map(request=["e"], label="kw")]
        return out

    expected = ["a*1:call", "b*2:submit", "c*3:map", "d*3:map"]
    assert sync_flow() == expected
    assert asyncio.run(async_flow()) == [*expected, "e*1:kw"]


@pytest.mark.parametrize(("sync", "async_", "registered"), PAIRS, ids=[p[0] for p in PAIRS])
def test_task_run_names_see_the_label(sync, async_, registered, monkeypatch):
    """The run-name callables read ``label`` (and ``task`` / ``request``) from the parameters
    Prefect bound against the shared signature."""
    t = getattr(tasks, async_)
    req = GenerateRequest(model="nanobanana", prompt="p")
    first = "task" if "task" in inspect.signature(t.fn).parameters else "request"
    bound = get_call_parameters(t.fn, ("gen_1" if first == "task" else req,), {"label": "L"})
    monkeypatch.setitem(task_run.FIELDS, "parameters", lambda: bound)
    name = t.task_run_name() if callable(t.task_run_name) else t.task_run_name
    assert name is not None and name.endswith(" · L")
    assert ("gen_1" in name) if first == "task" else ("nanobanana" in name)
