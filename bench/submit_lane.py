"""What the cross-worker submit lane costs: ledger-guarded submits per second, same run.

    python bench/submit_lane.py [--n 200] [--threads 16]

Rows (each against the emulator on loopback, ``pending`` long enough that nothing completes):
- ``raw POST``: ``client.generate`` from N threads, no ledger (the baseline: what the API allows);
- ``SQLite ledger``: ``Submitter.submit`` with the one-machine ledger and its lane;
- ``S3 ledger``: the same with the ledger in SeaweedFS, as workers on many machines share it.

Every POST of one (account, model, type) holds the lane from just before it is sent until its
answer is recorded, so a ledger-guarded submit rate is bounded by one POST plus the ledger writes
around it, whatever the number of threads or workers. Ratios are against the raw row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import local_stack

from prefect_eggapi.client import EggAPIClient
from prefect_eggapi.client.types import GenerateRequest
from prefect_eggapi.safety.ledger import LedgerStore, S3Ledger, SQLiteLedger
from prefect_eggapi.safety.submitter import Submitter
from prefect_eggapi.storage import build_s3_client


def _rate(n: int, threads: int, one: Callable[[int], object]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    with local_stack(pending_seconds=600, rate_limit_per_second=None) as stack:
        client = EggAPIClient(stack.api_key, stack.base_url, rate_limit=None)
        s3 = build_s3_client(stack.settings())
        tmp = Path(tempfile.mkdtemp()) / "bench-ledger.sqlite3"
        ledgers: dict[str, LedgerStore] = {
            "SQLite ledger": SQLiteLedger(tmp),
            "S3 ledger": S3Ledger(s3, stack.bucket, "bench/ledger"),
        }
        raw = _rate(
            args.n,
            args.threads,
            lambda i: client.generate(model="nanobanana", prompt=f"raw {i}"),
        )
        rows = [("raw POST", raw)]
        for name, ledger in ledgers.items():
            submitter = Submitter(client, ledger)

            def one(i: int, submitter: Submitter = submitter, name: str = name) -> object:
                request = GenerateRequest(model="nanobanana", prompt=f"{name} {i}")
                return submitter.submit(request, logical_key=f"{name}/{i}", scope="bench")

            rows.append((name, _rate(args.n, args.threads, one)))
        client.close()
    print(f"{args.n} submits from {args.threads} threads, one process")
    print(f"{'row':<16}{'submits/s':>12}{'vs raw':>10}")
    for name, rate in rows:
        print(f"{name:<16}{rate:>12.1f}{rate / raw:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
