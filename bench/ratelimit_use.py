"""Bench 5: how much of the emulator's per-key rate limit the batch flow uses, and its 429s.

The emulator enforces ``--limit`` requests per second per key (token bucket, burst = limit;
pending 0.5 s, processing 3 s); the flow's clients are configured with the same rate
(``EGGAPI_REQUESTS_PER_SECOND``, the documented setting). The batch has more waits in flight
than the limit can serve (``concurrency`` items, each polling every 1-5 s), so demand exceeds
the limit. This process samples the emulator's audit every 0.25 s; the achieved rate is the
number of API requests (submit + polls + list; downloads carry no key and are not limited)
between the moments 10 % and 90 % of them had arrived, divided by
that window: the steady state, without the initial burst and the tail.

    python bench/ratelimit_use.py [--n 200] [--limit 20] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import local_stack, prefect_env, run_child

LIMITED = ("generate", "get_task", "list_tasks")


def measure(
    n: int = 200,
    limit: float = 20.0,
    concurrency: int = 100,
    *,
    api_url: str | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    from prefect_eggapi.testing.emulator.config import key_id

    with local_stack(
        pending_seconds=0.5, processing_seconds=3.0, rate_limit_per_second=limit
    ) as stack:
        kid = key_id(stack.api_key)
        samples: list[tuple[float, int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                audit = stack.emulator.audit()
                counts = audit["requests"].get(kid, {})
                samples.append(
                    (
                        time.monotonic(),
                        sum(counts.get(e, 0) for e in LIMITED),
                        int(audit["rate_limited_by_key"].get(kid, 0)),
                    )
                )
                stop.wait(0.25)

        home = Path(tempfile.mkdtemp(prefix="eggapi-bench-home-"))
        env = {
            **stack.env(),
            **prefect_env(home, api_url),
            "EGGAPI_LEDGER_DIR": str(home / "ledger"),
            "EGGAPI_REQUESTS_PER_SECOND": f"{limit:g}",
        }
        tag = f"ratelimit-{time.time_ns()}"
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out = run_child(
                "overhead",
                {
                    "flow": "batch",
                    "n": n,
                    "concurrency": concurrency,
                    "tag": tag,
                    "name": tag,
                },
                env,
                log_dir=log_dir,
            )
        finally:
            stop.set()
            sampler.join(5)
        audit = stack.emulator.audit()
    counts = audit["requests"].get(kid, {})
    total = sum(counts.get(e, 0) for e in LIMITED)
    lo = next(s for s in samples if s[1] >= 0.1 * total)
    hi = next((s for s in samples if s[1] >= 0.9 * total), samples[-1])
    window = max(hi[0] - lo[0], 1e-9)
    achieved = (hi[1] - lo[1]) / window
    status_429 = int(audit["rate_limited_by_key"].get(kid, 0))
    return {
        "n": n,
        "limit": limit,
        "concurrency": concurrency,
        "images": out["images"],
        "requests": {e: counts.get(e, 0) for e in LIMITED},
        "api_requests": total,
        "achieved_rate": achieved,
        "use": achieved / limit,
        "window_s": window,
        "status_429": status_429,
        "share_429": status_429 / max(total, 1),
        "wall": out["wall"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--limit", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    r = measure(args.n, args.limit, args.concurrency)
    print(
        f"{r['images']} images; {r['api_requests']} API requests {r['requests']}; achieved "
        f"{r['achieved_rate']:.1f} req/s over {r['window_s']:.1f} s = {100 * r['use']:.0f} % of "
        f"the {r['limit']:g}/s limit; {r['status_429']} x 429 ({100 * r['share_429']:.1f} %)"
    )


if __name__ == "__main__":
    main()
