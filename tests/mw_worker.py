"""One batch worker, run as its own OS process by ``test_multiworker_money.py``.

    python tests/mw_worker.py --manifest M --run-key K --out result.json [--prefix P]
                              [--concurrency N] [--credentials-block NAME]

Everything else (API key and URL, bucket, ledger location, Prefect home/API) comes from the
environment the test gives the process, the way a worker on another machine would get it. The
run's ``BatchSummary`` (or the exception that ended it) is written to ``--out`` as JSON,
atomically, so the test can read what this run *reported* and compare it with what the emulator
billed. Items that fail do not fail the run (``fail_on_item_error=False``): the status objects
account for them.

The flow run's id is written to ``--out`` + ``.flow_run_id`` as soon as the run is Running (an
``on_running`` hook, before the flow body), so the oracle knows it even for a run SIGKILLed
mid-batch; it is also in the result as ``flow_run_id``. Each status object names the flow run
that wrote it (``run_id``): that is how the test tells which run accounted for which item.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mw_worker")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--run-key", default=None)
    parser.add_argument("--prefix", default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--credentials-block", default=None)
    args = parser.parse_args(argv)

    started = time.time()
    result: dict[str, object] = {"pid": os.getpid(), "started": started}
    code = 0
    try:
        from prefect_eggapi.flows import batch_generate

        def record_run_id(flow: object, flow_run: object, state: object) -> None:
            run_id = str(getattr(flow_run, "id", ""))
            result["flow_run_id"] = run_id
            _write_atomically(args.out + ".flow_run_id", run_id)

        summary = asyncio.run(
            batch_generate.with_options(on_running=[record_run_id])(
                manifest=args.manifest,
                concurrency=args.concurrency,
                run_key=args.run_key or None,
                prefix=args.prefix,
                fail_on_item_error=False,
                credentials_block=args.credentials_block,
            )
        )
        result["summary"] = json.loads(summary.model_dump_json())
    except BaseException as exc:  # report it; the test decides what it means
        result["error"] = {"type": type(exc).__name__, "message": str(exc)[:4000]}
        result["traceback"] = traceback.format_exc()[-8000:]
        code = 1
    result["seconds"] = round(time.time() - started, 2)
    _write_atomically(args.out, json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str))
    sys.stdout.flush()
    return code


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
