"""Schedules: serve the compress flow (or the base-model watcher) as a deployment.

Schedules need a real Prefect server: in local (ephemeral) mode Prefect only logs
"Cannot schedule flows on an ephemeral server". `squeeze stack up` starts one.
"""

from __future__ import annotations

import os
from pathlib import Path

from squeezeflow.settings import apply_defaults

apply_defaults()

from prefect import serve  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402

from squeezeflow.flows.compress import compress  # noqa: E402
from squeezeflow.flows.watch import watch_base  # noqa: E402


class NoServerError(RuntimeError):
    """Scheduling asked for without a real Prefect server."""


def require_server() -> str:
    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise NoServerError(
            "schedules need a real Prefect server; start one with `squeeze stack up` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (or point it at your team's server)"
        )
    return str(url)


def serve_recipe(
    recipe_path: Path,
    *,
    name: str,
    interval_s: float | None = None,
    cron: str | None = None,
    watch_base_model: str | None = None,
    limit: int = 1,  # compression jobs are heavy: by default one run at a time
) -> None:
    """Block, running the recipe on its schedule (or on new base versions)."""
    require_server()
    if (interval_s is None) == (cron is None):
        raise ValueError("give exactly one of an interval or a cron expression")
    schedule = {"interval": interval_s} if interval_s is not None else {"cron": cron}
    path = str(recipe_path.resolve())
    if watch_base_model is not None:
        deployment = watch_base.to_deployment(
            name=name, parameters={"recipe_path": path, "base_model_name": watch_base_model},
            **schedule,
        )
    else:
        deployment = compress.to_deployment(name=name, parameters={"recipe_path": path},
                                            **schedule)
    serve(deployment, limit=limit)
