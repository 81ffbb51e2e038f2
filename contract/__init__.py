"""The contract between the API and the engine, written once.

A plain package (pydantic and the standard library only: no torch, no web or database code)
that ``service/`` validates requests with and ``workers/engine/`` runs by: the attacks and
threat models, which attack supports which norm, the limits on every budget, and the metrics
each benchmark reports. The API refuses at submission exactly what the engine would refuse.
"""
