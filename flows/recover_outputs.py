"""Example: collect results nobody waited for — run it on a schedule (see deployments/).

EggAPI cannot cancel a task: a wait that hit its deadline leaves a task that may still complete
and bill, and a crashed run can leave one behind. This flow finds them in the submission ledger
(``abandoned`` / ``submitted`` / ``completed`` but not ``persisted``) and, optionally, in
``GET /v1/tasks``, then stores their outputs in S3 before the output URLs expire.

    python flows/recover_outputs.py
"""

from __future__ import annotations

import asyncio

from prefect_eggapi.flows import RecoverySummary, recover_outputs

__all__ = ["recover_outputs"]


def main() -> RecoverySummary:
    summary: RecoverySummary = asyncio.run(recover_outputs(scan_api_pages=5))
    print(summary.model_dump_json(indent=2))
    return summary


if __name__ == "__main__":
    main()
