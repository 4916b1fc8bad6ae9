"""Webhooks: signature verification, the per-submission nonce, signals, and the receiver app.

No Prefect here; the ``prefect-eggapi webhooks`` command (in :mod:`prefect_eggapi.cli`) adds
Prefect events on top.
"""
