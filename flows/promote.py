"""The `promote` flow: gate the candidates of a registered model and move `champion`."""

from __future__ import annotations

from squeezeflow.settings import apply_defaults

apply_defaults()

from prefect import flow, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from squeezeflow.evaluation.gates import PromotionGates  # noqa: E402
from squeezeflow.registry.promotion import PromotionOutcome  # noqa: E402
from squeezeflow.registry.promotion import promote as promote_in_registry  # noqa: E402


# Not retried: a PromotionError is a decision (candidates not comparable with the
# champion, a registry read that failed, the champion moved meanwhile) taken before any
# alias moved; the flow run fails with its message, and a new run re-reads everything.
@task(name="promote-candidates", retries=0)
def promote_candidates(model_name: str, gates: PromotionGates, version: str | None,
                       alias: str | None, tracking_uri: str | None,
                       decided_by: str) -> PromotionOutcome:
    return promote_in_registry(model_name, gates, version=version, alias=alias,
                               tracking_uri=tracking_uri, decided_by=decided_by)


@flow(name="promote")
def promote(
    model_name: str,
    gates: PromotionGates,
    version: str | None = None,
    alias: str | None = None,
    tracking_uri: str | None = None,
) -> PromotionOutcome:
    """Promote the best candidate of `model_name` that passes every gate (only versions
    evaluated on the champion's data and base compete; see registry/promotion.py)."""
    decided_by = f"prefect flow run {flow_run.get_id()}"
    return promote_candidates(model_name, gates, version, alias, tracking_uri, decided_by)
