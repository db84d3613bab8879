"""Tools that work on a run from outside its processes: ``monitor`` (live terminal view), ``plot`` (charts),
``evaluate`` (held-out prompts), ``reward_model_training`` (``train-rm``), and ``metrics_file`` (reading a run's
``metrics.jsonl`` as it grows, for the tools and the Python API)."""
