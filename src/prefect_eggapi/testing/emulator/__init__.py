"""A faithful local EggAPI emulator (FastAPI + Pillow) for demos, tests and benchmarks.

It implements ``docs/eggapi-api.md`` independently of the client: the same paths, envelopes,
status codes, Go-style validation messages, task lifecycle, per-key balances, rate limits,
moderation failures, newest-first pagination, usage endpoints, and real PNG outputs at
``/images/{task_id}/{i}.png`` sized as section 14 says. Section 17's assumptions are followed.

Start it
--------
- In a subprocess (tests, benchmarks)::

      from prefect_eggapi.testing.emulator import EmulatorConfig, EmulatorProcess, ApiKeyConfig
      with EmulatorProcess(EmulatorConfig(api_keys={"egg_sk_test": ApiKeyConfig()})) as emu:
          emu.base_url            # http://127.0.0.1:<free port>
          emu.add_fault("error_after_create", status=502)

- In the foreground: ``prefect-eggapi emulator --port 8787 --api-key egg_sk_...`` or
  ``python -m prefect_eggapi.testing.emulator --port 8787``.
- In-process: ``create_app(config)`` returns the FastAPI app; its state (tasks, audit, faults)
  is ``app.state.emulator``.

Admin API (no API key; loopback clients only; standard envelope)
----------------------------------------------------------------
``GET  /_emulator/health``                    ``{status, pid, base_url, tasks}``
``GET  /_emulator/config``                    live config, API keys masked
``PATCH /_emulator/config``                   partial update; ``api_keys`` merges per key and a
                                              given ``balance`` resets that key's live balance
``GET  /_emulator/faults``                    rules with ``seen``/``fired``/``exhausted``
``POST /_emulator/faults``                    a rule, a list, or ``{"rules": [...]}``
``DELETE /_emulator/faults`` (or ``POST /_emulator/faults/clear``)
``GET  /_emulator/audit``                     created tasks, request counts, 429s, balances
``POST /_emulator/reset``                     forget everything; optional ``{"config": {...}}``
``GET  /_emulator/tasks[/{id}]``              every task of every key (edits: ``image_urls``,
                                              ``sources``, ``input_fetches``)
``POST /_emulator/tasks/{id}/advance``        one lifecycle step (planned outcome at the end;
                                              an edit's last step waits for its inputs)
``POST /_emulator/tasks/{id}/complete``       optional ``{"num_images": n}`` (waits likewise)
``POST /_emulator/tasks/{id}/fail``           optional ``{"error": "..."}``

Admin reads (audit, tasks) never advance tasks themselves, so they show what the background
scheduler did; API reads apply due transitions first, so they are never stale.

Edits are real edits (assumption 17.21, revised)
-----------------------------------------------
A request with ``image_urls`` is an ``image_edit``. While it is ``processing`` (never at POST
time) the emulator fetches every input over HTTP, without blocking anything else; an input that
is unreachable, refused (4xx/5xx, e.g. an expired presigned S3 URL), larger than
``input_max_bytes`` (20 MiB, streamed) or not a PNG/JPEG/WEBP image fails the task with
``Upstream provider error: input image image_urls[i] (...) ...`` and ``cost "$0.00"`` (not
billed, like every failed task). See :mod:`prefect_eggapi.testing.emulator.inputs` for the messages.
Loopback inputs (the emulator's own ``/images/...``, the local S3 server) are allowed only
because the emulator runs on loopback; ``input_allowed_hosts`` (default: loopback) says where
else it may fetch from. ``fetch_inputs: false`` turns fetching off.

Every output PNG shows its prompt and carries these text chunks (a contract: never renamed):

- ``eggapi:prompt``: the prompt of the request;
- ``eggapi:sources``: for an edit, the sha256 hex of the exact bytes fetched from each input, in
  ``image_urls`` order, comma-separated; empty for a generation;
- ``eggapi:task_id``, ``eggapi:index``, ``eggapi:type``.

An edit's output is drawn from its first input (scaled in, tinted, framed, with the prompt
below), so a test can prove from the bytes that round k was made from round k-1.

Fault rules
-----------
``{"kind": K, "endpoint": "generate"|"get_task"|"list_tasks"|"download"|"usage"|"any",
"status": 500, "code": null, "message": null, "times": 1, "skip": 0, "delay": 0.0,
"bytes_per_second": 65536, "fraction": 0.5, "api_key": null}``; kinds: ``error_before_create``,
``error_after_create``, ``drop_after_create``, ``timeout_after_create``, ``http_error``,
``rate_limit_burst``, ``upstream_failure``, ``empty_output``, ``slow_download``,
``truncated_download``. See :mod:`prefect_eggapi.testing.emulator.faults` for the counting rules.

Seeded fault rates: a rule with ``"rate": 0.1`` fires at each opportunity with that probability,
reproducibly for a given ``fault_seed`` (else ``seed``) and order of calls. Shorthand in the
config, the CLI (``--fault-rate NAME=RATE --fault-seed N``) or ``PATCH /_emulator/config``::

    {"fault_rates": {"post_502_before_create": 0.1, "post_502_after_create": 0.05,
                     "drop_after_create": 0.05, "late_answer": 0.02, "upstream_failure": 0.1},
     "fault_seed": 7}
"""

from __future__ import annotations

from .admin import EmulatorAdmin
from .app import create_app
from .config import DEFAULT_API_KEY, ApiKeyConfig, EmulatorConfig, FaultRule
from .server import EmulatorProcess

__all__ = [
    "DEFAULT_API_KEY",
    "ApiKeyConfig",
    "EmulatorAdmin",
    "EmulatorConfig",
    "EmulatorProcess",
    "FaultRule",
    "create_app",
]
