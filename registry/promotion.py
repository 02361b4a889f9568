"""Promotion: move the `champion` alias to the best candidate that passes every gate.

Every decision is recorded on the versions it looked at (tags `promotion.*`: result,
the gate results, who or what decided and when). The champion's history is kept as
a registered-model tag, so `rollback` can restore the previous champion. An alias
never moves on missing metrics, an unknown model or alias, or an unreachable server.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import socket
import urllib.error
import urllib.request

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from squeezeflow.evaluation.gates import (
    GateResult,
    PromotionGates,
    promotion_checks,
    quality_score,
)
from squeezeflow.registry.store import connect

log = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "squeezeflow.champion_history"  # JSON list of champion versions, oldest first


class PromotionError(RuntimeError):
    """Promotion refused before any alias moved."""


class Decision(BaseModel):
    version: str
    results: list[GateResult]
    passed: bool


class PromotionOutcome(BaseModel):
    model_name: str
    previous_champion: str | None
    champion: str | None
    promoted: bool
    decisions: list[Decision]


def actor() -> str:
    """Who or what decides: the user and host, unless the caller names a flow run."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def open_registry(model_name: str, tracking_uri: str | None) -> MlflowClient:
    """A client for a reachable registry holding `model_name`, or a PromotionError."""
    client = connect(tracking_uri)
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            raise PromotionError(f"the registry at {uri} is unreachable: {error}") from None
    try:
        client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise PromotionError(f"registry error for {model_name!r}: {error.message}") from None
        known = sorted(m.name for m in client.search_registered_models())
        raise PromotionError(
            f"no registered model named {model_name!r}; known models: {', '.join(known) or 'none'}"
        ) from None
    return client


def promote(
    model_name: str,
    gates: PromotionGates,
    *,
    version: str | None = None,
    alias: str | None = None,
    tracking_uri: str | None = None,
    decided_by: str | None = None,
) -> PromotionOutcome:
    """Check candidates against the champion; move `champion` to the best that passes.

    Candidates: `version`, or the version holding `alias`, or else every version whose
    recipe gates passed (tag `gate=passed`) other than the current champion.
    """
    if gates.is_empty():
        raise PromotionError(
            "no promotion gates: give them in the recipe's `promotion:` section or on the "
            "command line (--max-quality-drop, --min-speedup, --max-size-mb, --max-latency-ms)"
        )
    client = open_registry(model_name, tracking_uri)
    champion = _version_by_alias(client, model_name, CHAMPION, required=False)
    champion_metrics = _metrics(client, champion.run_id) if champion is not None else None
    candidates = _candidates(client, model_name, version, alias, champion)
    if not candidates:
        raise PromotionError(f"{model_name} has no candidate versions to promote")

    decided_by = decided_by or actor()
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    decisions = []
    for candidate in candidates:
        results = promotion_checks(gates, _metrics(client, candidate.run_id), champion_metrics)
        decisions.append(Decision(version=str(candidate.version), results=results,
                                  passed=all(r.passed for r in results)))
    passing = [d for d in decisions if d.passed]
    best = max(
        passing,
        key=lambda d: (quality_score(_metrics(client, _run_of(candidates, d.version))),
                       int(d.version)),
        default=None,
    )
    for decision in decisions:
        result = "promoted" if best is not None and decision.version == best.version else (
            "passed, not best" if decision.passed else "rejected")
        tags = {
            "promotion.result": result,
            "promotion.at": now,
            "promotion.by": decided_by,
            "promotion.against": str(champion.version) if champion is not None else "base",
            "promotion.gates": "; ".join(
                f"{'pass' if r.passed else 'fail'}: {r.gate} "
                f"({'missing' if r.value is None else f'{r.value:.6g}'})"
                for r in decision.results
            ),
        }
        for key, value in tags.items():
            client.set_model_version_tag(model_name, decision.version, key, value)
    previous = str(champion.version) if champion is not None else None
    if best is None:
        log.info("no candidate of %s passed every gate; champion stays %s", model_name, previous)
        return PromotionOutcome(model_name=model_name, previous_champion=previous,
                                champion=previous, promoted=False, decisions=decisions)
    client.set_registered_model_alias(model_name, CHAMPION, best.version)
    history = _history(client, model_name)
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history + [best.version]))
    if previous is not None:
        client.set_model_version_tag(model_name, best.version, "promotion.previous_champion",
                                     previous)
    return PromotionOutcome(model_name=model_name, previous_champion=previous,
                            champion=best.version, promoted=True, decisions=decisions)


def rollback(model_name: str, tracking_uri: str | None = None,
             decided_by: str | None = None) -> PromotionOutcome:
    """Give `champion` back to the version that held it before the current one."""
    client = open_registry(model_name, tracking_uri)
    history = _history(client, model_name)
    current = _version_by_alias(client, model_name, CHAMPION, required=False)
    if current is None or len(history) < 2:
        raise PromotionError(f"{model_name} has no previous champion to roll back to")
    restored = history[-2]
    client.set_registered_model_alias(model_name, CHAMPION, restored)
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history[:-1]))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    who = decided_by or actor()
    client.set_model_version_tag(model_name, str(current.version), "promotion.result",
                                 f"rolled back to {restored}")
    client.set_model_version_tag(model_name, restored, "promotion.result", "restored by rollback")
    for version in (str(current.version), restored):
        client.set_model_version_tag(model_name, version, "promotion.at", now)
        client.set_model_version_tag(model_name, version, "promotion.by", who)
    return PromotionOutcome(model_name=model_name, previous_champion=str(current.version),
                            champion=restored, promoted=True, decisions=[])


def _history(client: MlflowClient, model_name: str) -> list[str]:
    raw = client.get_registered_model(model_name).tags.get(HISTORY_TAG, "[]")
    history: list[str] = json.loads(raw)
    return history


def _version_by_alias(client: MlflowClient, model_name: str, alias: str, required: bool):  # type: ignore[no-untyped-def]
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as error:
        if required:
            aliases = sorted(client.get_registered_model(model_name).aliases)
            raise PromotionError(
                f"{model_name} has no alias {alias!r}; its aliases: {', '.join(aliases) or 'none'}"
            ) from error
        return None


def _candidates(client: MlflowClient, model_name: str, version: str | None, alias: str | None,
                champion):  # type: ignore[no-untyped-def]
    if version is not None:
        try:
            return [client.get_model_version(model_name, version)]
        except MlflowException as error:
            raise PromotionError(f"{model_name} has no version {version}") from error
    if alias is not None:
        return [_version_by_alias(client, model_name, alias, required=True)]
    champion_version = str(champion.version) if champion is not None else None
    return [
        found for found in client.search_model_versions(f"name = '{model_name}'")
        if found.tags.get("gate") == "passed" and str(found.version) != champion_version
    ]


def _metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    return dict(client.get_run(run_id).data.metrics)


def _run_of(candidates: list, version: str) -> str | None:  # type: ignore[type-arg]
    return next(c.run_id for c in candidates if str(c.version) == version)
