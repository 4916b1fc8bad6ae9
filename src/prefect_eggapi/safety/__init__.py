"""Paying at most once: the ledger (SQLite or S3), reconciliation of lost answers, the submitter.

``ledger`` (what was paid for, crash-safe), ``reconcile`` (what a lost answer created),
``decisions`` (the submitter's decision table, no I/O), ``lanes`` (POSTs in flight per model),
``outcomes`` (entries moved on after a wait or a persist), ``submitter`` (carries it all out).

No Prefect here. Every decision that spends money is made in this layer, so it can be tested
without servers and reused outside Prefect.
"""
