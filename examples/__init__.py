"""Runnable examples: each trains on bundled data with its own reward through the normal launcher.

``python -m examples.summarization``, ``python -m examples.dialogue``, ``python -m examples.code_generation``
(add ``--model tiny --max-updates 2`` for a smoke run). Offline: the data ships in ``examples/data``.
"""
