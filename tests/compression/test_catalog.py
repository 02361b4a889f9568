"""Catalog behaviour, and one contract test run over every registered step."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from squeezeflow.compression.catalog import CATALOG, Catalog, UnknownStepError
from squeezeflow.compression.config import StepConfig
from squeezeflow.compression.step import Needs, Step, StepReport, TrainingContext
from squeezeflow.testing import save_model, tiny_llama, tiny_mixtral


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


MOE_KINDS = {"moe_merge", "qmoe"}  # steps that need a mixture-of-experts model


@pytest.mark.parametrize("kind", CATALOG.kinds())
def test_step_contract(kind: str, tmp_path: Path) -> None:
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
    model, tokenizer = (tiny_mixtral if kind in MOE_KINDS else tiny_llama)()
    step = CATALOG.build(config)
    modules = step.select(model)
    assert modules and not any("lm_head" in name or "embed" in name for name in modules)
    batch = tokenizer(["The robot repaired the garden fence."], return_tensors="pt")
    if step.needs in (Needs.TRAINING, Needs.TEACHER):
        # training steps train the whole model through `train`, against a teacher
        teacher, _ = tiny_llama(seed=1)
        teacher_dir = save_model(teacher, tokenizer, tmp_path / "teacher")
        short = entry.config_cls.model_validate({"kind": kind, "max_steps": 2, "log_every": 1})
        step = CATALOG.build(short)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        context = TrainingContext(batches=[dict(batch)], folder=tmp_path / "train", teacher=teacher_dir)
        report = step.train(model, context)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and report.kind == kind and report.curves["loss"][-1][0] == 2
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        return
    if step.changes_structure:
        # structural steps select what they observe (blocks, MoE layers, Linears), change the
        # model in `restructure`, and the changed model still runs
        with step.observe(modules):
            model(**batch)
        report = step.apply(modules)
        step.restructure(model)
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    else:
        # Linears; or a MoE layer's experts, stored as 3-D parameters without a `weight`
        assert all(isinstance(m, nn.Linear) for m in modules.values()) or kind in MOE_KINDS
        before = {name: [p.detach().clone() for p in m.parameters()] for name, m in modules.items()}
        with step.observe(modules):
            if step.needs is not Needs.NOTHING:
                model(**batch)
        report = step.apply(modules)
        changed = [n for n, m in modules.items()
                   if any(not torch.equal(p, old) for p, old in zip(m.parameters(), before[n], strict=True))]
        if kind == "smoothquant":
            # it changes the Linears whose scales fold into a norm; the others keep a
            # runtime factor for the w8a8 step (a tiny Llama has both kinds)
            folded = [n for n in modules if report.per_module[n]["folded"]]
            assert changed == folded and 0 < len(folded) < len(modules)
        else:
            assert changed == list(modules) or kind == "magnitude" and config.sparsity == 0
    assert isinstance(report, StepReport) and report.kind == kind
    assert set(report.per_module) == set(modules)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
