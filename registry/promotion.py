"""Promotion: move the `champion` alias to the best candidate that passes every gate.

Every decision is recorded on the versions it looked at (tags `promotion.*`: result,
the gate results, who or what decided and when). The champion's history is kept as
a registered-model tag, so `rollback` can restore the previous champion.

An alias never moves on missing metrics, an unknown model or alias, an unreachable
server, or a registry error while reading: a read that fails aborts the promotion
(PromotionError) instead of reading as "no champion". A candidate is compared with the
champion only if both were evaluated on the same data against the same base (their
`squeezeflow.evaluation_sha256` and `squeezeflow.base_sha256` tags); otherwise it is
refused with both hashes named.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from squeezeflow.evaluation.gates import (
    GateResult,
    PromotionGates,
    promotion_checks,
    quality_score,
)
from squeezeflow.registry.runs import TAG_PREFIX
from squeezeflow.registry.store import connect

log = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "squeezeflow.champion_history"  # JSON list of champion versions, oldest first
# What two versions' metrics must share to be compared: the held-out data both were
# evaluated on, and the base their quality drop and speed-up are measured against.
COMPARED_ON = (
    (TAG_PREFIX + "evaluation_sha256", "evaluation data"),
    (TAG_PREFIX + "base_sha256", "base model"),
)


class PromotionError(RuntimeError):
    """Promotion refused before any alias moved."""


class Decision(BaseModel):
    version: str
    results: list[GateResult]
    passed: bool
    refused: str | None = None  # why it was not compared with the champion at all


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
        with _reading("the registered models"):
            known = sorted(m.name for m in client.search_registered_models())
        raise PromotionError(
            f"no registered model named {model_name!r}; known models: {', '.join(known) or 'none'}"
        ) from None
    return client


def incomparable(candidate: ModelVersion, champion: ModelVersion) -> str | None:
    """Why `candidate` cannot be compared with `champion` (None when it can): a
    different or unrecorded evaluation data or base hash, with both hashes named."""
    for tag, what in COMPARED_ON:
        mine, theirs = candidate.tags.get(tag), champion.tags.get(tag)
        if mine is None or theirs is None or mine != theirs:
            return (f"version {candidate.version} and champion version {champion.version} "
                    f"were evaluated with different {what} ({tag}: {mine or 'not recorded'} vs "
                    f"{theirs or 'not recorded'}); their metrics are not comparable")
    return None


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
    recipe gates passed (tag `gate=passed`) other than the current champion. Candidates
    evaluated on other data or another base than the champion are refused (tagged
    `promotion.result=refused: ...`); if every candidate is refused, or any registry
    read fails, a PromotionError is raised and nothing is written.
    """
    if gates.is_empty():
        raise PromotionError(
            "no promotion gates: give them in the recipe's `promotion:` section or on the "
            "command line (--max-quality-drop, --min-speedup, --max-size-mb, --max-latency-ms)"
        )
    client = open_registry(model_name, tracking_uri)
    with _reading(f"the champion and candidates of {model_name}"):
        aliases = _aliases(client, model_name)
        champion = (client.get_model_version(model_name, aliases[CHAMPION])
                    if CHAMPION in aliases else None)
        champion_metrics = _metrics(client, champion.run_id) if champion is not None else None
        candidates = _candidates(client, model_name, version, alias, aliases)
        metrics = {str(c.version): _metrics(client, c.run_id) for c in candidates}
        history = _history(client, model_name)
    if not candidates:
        raise PromotionError(f"{model_name} has no candidate versions to promote")
    refusals = {
        str(c.version): reason for c in candidates
        if champion is not None and (reason := incomparable(c, champion)) is not None
    }
    if len(refusals) == len(candidates):
        raise PromotionError("; ".join(refusals.values()) + "; no alias moved")

    decisions = []
    for candidate in candidates:
        number = str(candidate.version)
        if number in refusals:
            decisions.append(Decision(version=number, results=[], passed=False,
                                      refused=refusals[number]))
            continue
        results = promotion_checks(gates, metrics[number], champion_metrics)
        decisions.append(Decision(version=number, results=results,
                                  passed=all(r.passed for r in results)))
    best = max(
        (d for d in decisions if d.passed),
        key=lambda d: (quality_score(metrics[d.version]), int(d.version)),
        default=None,
    )
    previous = str(champion.version) if champion is not None else None
    _record_decisions(client, model_name, decisions, best, previous, decided_by or actor())
    if best is None:
        log.info("no candidate of %s passed every gate; champion stays %s", model_name, previous)
        return PromotionOutcome(model_name=model_name, previous_champion=previous,
                                champion=previous, promoted=False, decisions=decisions)
    _move_champion(client, model_name, best.version, previous, history)
    return PromotionOutcome(model_name=model_name, previous_champion=previous,
                            champion=best.version, promoted=True, decisions=decisions)


def rollback(model_name: str, tracking_uri: str | None = None,
             decided_by: str | None = None) -> PromotionOutcome:
    """Give `champion` back to the version that held it before the current one."""
    client = open_registry(model_name, tracking_uri)
    with _reading(f"the champion history of {model_name}"):
        history = _history(client, model_name)
        current = _aliases(client, model_name).get(CHAMPION)
    if current is None or len(history) < 2:
        raise PromotionError(f"{model_name} has no previous champion to roll back to")
    restored = history[-2]
    _move_champion(client, model_name, restored, current, history[:-2], note_previous=False)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    who = decided_by or actor()
    with _writing("the rollback tags", f"champion is version {restored} again"):
        client.set_model_version_tag(model_name, current, "promotion.result",
                                     f"rolled back to {restored}")
        client.set_model_version_tag(model_name, restored, "promotion.result",
                                     "restored by rollback")
        for version in (current, restored):
            client.set_model_version_tag(model_name, version, "promotion.at", now)
            client.set_model_version_tag(model_name, version, "promotion.by", who)
    return PromotionOutcome(model_name=model_name, previous_champion=current,
                            champion=restored, promoted=True, decisions=[])


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """Any failure to read the registry aborts: an unknown champion is not "no champion"."""
    try:
        yield
    except PromotionError:
        raise
    except Exception as error:
        raise PromotionError(
            f"registry error while reading {what} ({type(error).__name__}: "
            f"{_first_line(error)}); no alias moved"
        ) from error


@contextmanager
def _writing(what: str, state: str) -> Iterator[None]:
    """A failed write is a PromotionError that says where the alias stands."""
    try:
        yield
    except Exception as error:
        raise PromotionError(
            f"registry error while writing {what} ({type(error).__name__}: "
            f"{_first_line(error)}); {state}"
        ) from error


def _record_decisions(client: MlflowClient, model_name: str, decisions: list[Decision],
                      best: Decision | None, previous: str | None, decided_by: str) -> None:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with _writing("the decision tags", "no alias moved"):
        for decision in decisions:
            if decision.refused is not None:
                result = f"refused: {decision.refused}"
            elif best is not None and decision.version == best.version:
                result = "promoted"
            else:
                result = "passed, not best" if decision.passed else "rejected"
            tags = {
                "promotion.result": result,
                "promotion.at": now,
                "promotion.by": decided_by,
                "promotion.against": previous or "base",
                "promotion.gates": "; ".join(
                    f"{'pass' if r.passed else 'fail'}: {r.gate} "
                    f"({'missing' if r.value is None else f'{r.value:.6g}'})"
                    for r in decision.results
                ),
            }
            for key, value in tags.items():
                client.set_model_version_tag(model_name, decision.version, key, value)


def _move_champion(client: MlflowClient, model_name: str, new: str, expected: str | None,
                   history_before: list[str], note_previous: bool = True) -> None:
    """Point `champion` at `new` if it still points at `expected`, and make the history
    `history_before + [new]` (with `note_previous`, tag `new` with the champion it
    replaced); on a registry error the alias is put back where it was."""
    with _reading(f"the champion of {model_name}"):
        current = _aliases(client, model_name).get(CHAMPION)
    if current != expected:  # another promotion or rollback moved it meanwhile
        raise PromotionError(
            f"the champion of {model_name} moved to {current or 'none'} while this promotion "
            f"decided against {expected or 'the base'}; no alias moved: run it again"
        )
    try:
        client.set_registered_model_alias(model_name, CHAMPION, new)
        client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history_before + [new]))
        if note_previous and expected is not None:
            client.set_model_version_tag(model_name, new, "promotion.previous_champion", expected)
    except Exception as error:
        state = _restore_champion(client, model_name, expected)
        raise PromotionError(
            f"registry error while moving {CHAMPION} of {model_name} to version {new} "
            f"({type(error).__name__}: {_first_line(error)}); {state}"
        ) from error


def _restore_champion(client: MlflowClient, model_name: str, previous: str | None) -> str:
    """Put `champion` back on `previous` (or remove it); says where it stands."""
    try:
        if previous is None:
            try:
                client.delete_registered_model_alias(model_name, CHAMPION)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            return "no alias moved (there is still no champion)"
        client.set_registered_model_alias(model_name, CHAMPION, previous)
        return f"no alias moved (champion is version {previous})"
    except Exception as error:
        return (f"the champion alias could not be checked or restored ({_first_line(error)}): "
                f"see `squeeze list {model_name}`")


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    """alias -> version of the registered model (read fresh: search results carry none)."""
    return {alias: str(number) for alias, number in
            client.get_registered_model(model_name).aliases.items()}


def _history(client: MlflowClient, model_name: str) -> list[str]:
    raw = client.get_registered_model(model_name).tags.get(HISTORY_TAG, "[]")
    history: list[str] = json.loads(raw)
    return history


def _candidates(client: MlflowClient, model_name: str, version: str | None, alias: str | None,
                aliases: dict[str, str]) -> list[ModelVersion]:
    if version is not None:
        try:
            return [client.get_model_version(model_name, version)]
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # a registry error, not an unknown version
            raise PromotionError(f"{model_name} has no version {version}") from error
    if alias is not None:
        if alias not in aliases:
            raise PromotionError(
                f"{model_name} has no alias {alias!r}; its aliases: "
                f"{', '.join(sorted(aliases)) or 'none'}"
            )
        return [client.get_model_version(model_name, aliases[alias])]
    champion_version = aliases.get(CHAMPION)
    return [
        found for found in client.search_model_versions(f"name = '{model_name}'")
        if found.tags.get("gate") == "passed" and str(found.version) != champion_version
    ]


def _metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    return dict(client.get_run(run_id).data.metrics)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
