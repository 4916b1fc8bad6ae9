"""Paying at most once: the ledger (SQLite or S3), reconciliation of lost answers, the submitter.

No Prefect here. Every decision that spends money is made in this layer, so it can be tested
without servers and reused outside Prefect.
"""
