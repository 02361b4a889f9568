"""Catalog behaviour, and one contract test run over every registered step."""

from __future__ import annotations

import re
from typing import Literal

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from squeezeflow.compression.catalog import CATALOG, Catalog, UnknownStepError
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.step import Needs, Step, StepReport
from squeezeflow.testing import tiny_llama


def test_unknown_kind_names_the_known_kinds() -> None:
    with pytest.raises(UnknownStepError, match=r"unknown step kind 'gtpq'; known kinds: .*rtn"):
        CATALOG.parse({"kind": "gtpq"})


def test_duplicate_kind_is_an_error() -> None:
    class DupConfig(StepConfig):
        kind: Literal["dup"] = "dup"

    catalog = Catalog()
    catalog.add(DupConfig, Step)
    with pytest.raises(ValueError, match="already registered"):
        catalog.add(DupConfig, Step)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ValidationError, match=r"unknown key 'bitz'; valid keys: bits, "):
        CATALOG.parse({"kind": "rtn", "bitz": 4})


def _snippets(step_cls: type) -> list[str]:
    doc = __import__(step_cls.__module__, fromlist=["_"]).__doc__ or ""
    return re.findall(r"```yaml\n(.*?)```", doc, flags=re.S)


@pytest.mark.parametrize("kind", CATALOG.kinds())
def test_step_contract(kind: str) -> None:
    entry = CATALOG.entry(kind)
    # its documentation carries a YAML snippet that parses into its config
    snippets = _snippets(entry.step_cls)
    assert snippets, f"{kind}: the step module's docstring needs a ```yaml snippet"
    for snippet in snippets:
        for raw in yaml.safe_load(snippet):
            assert CATALOG.parse(raw).kind == kind
    # configs are frozen and reject unknown keys
    config = entry.config_cls()
    with pytest.raises(ValidationError):
        entry.config_cls.model_validate({"kind": kind, "no_such_field": 1})
    # applying it to a model changes weights, reports per module, and leaves no hooks
    model, tokenizer = tiny_llama()
    step = CATALOG.build(config)
    modules = step.select(model)
    assert modules and all(isinstance(m, nn.Linear) for m in modules.values())
    assert not any("lm_head" in name or "embed" in name for name in modules)
    before = {name: m.weight.detach().clone() for name, m in modules.items()}
    batch = tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    with step.observe(modules):
        if step.needs is not Needs.NOTHING:
            model(**batch)
    report = step.apply(modules)
    assert isinstance(report, StepReport) and report.kind == kind
    assert set(report.per_module) == set(modules)
    changed = [n for n, m in modules.items() if not torch.equal(m.weight, before[n])]
    assert changed == list(modules) or kind == "magnitude" and config.sparsity == 0
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
