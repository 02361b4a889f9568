"""Environment defaults applied before prefect or mlflow are imported.

Each is a default only (`setdefault`): a value the user exported wins.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # 2-core machines take 15-25 s
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",  # forked workers of a tokenizer warn and can deadlock
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the CLI shows its own progress
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Keep Prefect's local state in the project, not in ~/.prefect.
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))


def user_cache(name: str) -> Path:
    """`$XDG_CACHE_HOME/squeezeflow/<name>` (else `~/.cache/...`): what is kept per user and
    machine, not per project (remembered checks, matplotlib's font cache, templates)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser().resolve() / "squeezeflow" / name


def quiet_progress_bars() -> None:
    """Hide transformers' per-load progress bars (the CLI and benchmarks show their own)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
