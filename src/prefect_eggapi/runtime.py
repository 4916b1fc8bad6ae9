"""The run scope: which logical run a submit belongs to, for ledger keys and budgets.

A flow retry keeps its flow run id, and two runs of one scheduled deployment slot share the slot;
both must reconnect to the tasks already paid for rather than submit again.
"""

from __future__ import annotations


def run_scope() -> str:
    """``deployment:<id>:<scheduled start>`` for scheduled runs, else ``flow-run:<id>``.

    Outside any flow run the scope is ``adhoc``: pass an explicit ``key`` there.
    """
    from prefect.runtime import deployment, flow_run

    run_id = flow_run.id
    if not run_id:
        return "adhoc"
    deployment_id = deployment.id
    scheduled = flow_run.scheduled_start_time
    if deployment_id and scheduled is not None:
        return f"deployment:{deployment_id}:{scheduled.isoformat()}"
    return f"flow-run:{run_id}"
