"""Untrusted models run here: a jailed child process (:mod:`.child`) started by the worker's
supervisor (:mod:`.jail`); the two talk over a pipe in JSON lines (docs/SECURITY.md)."""
