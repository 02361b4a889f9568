"""infra/prefect.yaml names flows that exist, with parameters they take."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect import Flow

REPO = Path(__file__).resolve().parents[1]


def test_every_deployment_names_a_flow_and_its_parameters() -> None:
    deployments = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]
    assert {d["entrypoint"] for d in deployments} >= {"flows/compress.py:compress", "flows/search.py:search"}
    for deployment in deployments:
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module("squeezeflow." + path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow), deployment["name"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, (deployment["name"], accepted)
        recipe = deployment.get("parameters", {}).get("recipe_path")
        assert recipe is None or (REPO / recipe).is_file(), recipe
