"""One submitter with webhooks on, run as its own OS process by ``test_webhook_attribution.py``.

    python tests/wh_submitter.py --ledger LOCATION --prompt P --key K --webhook-url URL --out F
                                 [--delivery-wait S] [--lane-width N] [--sibling-wait S]

API key and URL come from ``EGGAPI_API_KEY`` / ``EGGAPI_BASE_URL``, S3 settings from the AWS
variables, the way a worker gets them. Writes ``{"task_id", "adopted", "reconnected"}`` or
``{"error", "message"}`` to ``--out`` (atomically), so the test compares it with the emulator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wh_submitter")
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--label", default="")
    parser.add_argument("--webhook-url", default="")
    parser.add_argument("--delivery-wait", type=float, default=120.0)
    parser.add_argument("--lane-width", type=int, default=1)
    parser.add_argument("--sibling-wait", type=float, default=10.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.client.errors import EggAPIError
    from prefect_eggapi.client.types import GenerateRequest
    from prefect_eggapi.safety.ledger import ledger_at
    from prefect_eggapi.safety.submitter import Submitter

    request = GenerateRequest(
        model="nanobanana", prompt=args.prompt, webhook_url=args.webhook_url or None
    )
    result: dict[str, object]
    with EggAPIClient(
        os.environ["EGGAPI_API_KEY"], os.environ["EGGAPI_BASE_URL"], rate_limit=None
    ) as client:
        submitter = Submitter(
            client,
            ledger_at(args.ledger),
            settle_seconds=0.5,
            delivery_wait_seconds=args.delivery_wait,
            delivery_poll=0.1,
            lane_width=args.lane_width,
            sibling_wait_seconds=args.sibling_wait,
        )
        try:
            outcome = submitter.submit(request, logical_key=args.key, label=args.label)
            result = {
                "task_id": outcome.task.id,
                "adopted": outcome.adopted,
                "reconnected": outcome.reconnected,
                "nonces": outcome.entry.nonces,
            }
        except EggAPIError as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
