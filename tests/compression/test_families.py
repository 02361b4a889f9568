"""Model families: detection, loading, serving, distillation defaults, and a new family
registered here being picked up by detection and by the evaluation suite."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    LlamaConfig,
)

from squeezeflow.compression.artifact import save_compressed
from squeezeflow.compression.distillation.kd.config import DistillConfig, Losses, unavailable_loss
from squeezeflow.compression.families import (
    FAMILIES,
    ModelFamily,
    UnknownFamilyError,
    detect_family,
    family,
    register_family,
)
from squeezeflow.compression.quantization.pvtuning.config import PVTuneConfig
from squeezeflow.evaluation import metrics as metric_table
from squeezeflow.evaluation import suite
from squeezeflow.evaluation.gates import quality_score
from squeezeflow.testing import tiny_bert, tiny_llama


def test_detection_of_the_built_in_families() -> None:
    assert detect_family(LlamaConfig(architectures=["LlamaForCausalLM"])).name == "causal-lm"
    assert detect_family(GPT2Config(architectures=["GPT2LMHeadModel"])).name == "causal-lm"
    assert detect_family(BertConfig(is_decoder=True)).name == "causal-lm"
    assert detect_family(BertConfig(architectures=["BertModel"])).name == "encoder"


def test_an_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(UnknownFamilyError, match="unknown model family 'decoder'; known families: "
                                                 "causal-lm, encoder"):
        family("decoder")


def test_auto_classes() -> None:
    assert family("encoder").model_class() is AutoModel
    assert family("causal-lm").model_class() is AutoModelForCausalLM


def test_headline_quality_metrics_are_quality_metrics_of_their_family() -> None:
    for entry in FAMILIES.entries():
        quality = metric_table.metric(entry.quality_metric)
        assert entry.name in quality.quality_for and quality.direction is not None
        assert entry.evaluator in suite.QUALITY_EVALUATORS


def test_forward_and_serve() -> None:
    bert, bert_tokenizer = tiny_bert()
    llama, llama_tokenizer = tiny_llama()
    texts = ["the cat sat", "a dog ran far away"]
    encoder, causal = family("encoder"), family("causal-lm")
    with torch.inference_mode():
        batch = bert_tokenizer(texts, padding=True, return_tensors="pt")
        embeddings = encoder.serve(bert, bert_tokenizer, batch, {})  # numpy (2, hidden)
        assert embeddings.shape == (2, 64)
        assert torch.allclose(torch.from_numpy(embeddings).norm(dim=-1), torch.ones(2), atol=1e-5)
        batch = llama_tokenizer(texts, padding=True, return_tensors="pt")
        logits = causal.forward(llama, batch).logits
        assert logits.shape == (2, batch["input_ids"].shape[1], len(llama_tokenizer))
        completions = causal.serve(llama, llama_tokenizer, batch, {"max_new_tokens": 3})
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    assert "decode" in causal.latency and "decode" not in encoder.latency


def test_distillation_losses_by_family() -> None:
    llama_config = LlamaConfig(architectures=["LlamaForCausalLM"], num_hidden_layers=2)
    assert Losses(**family("causal-lm").distill_defaults) == Losses(logits=1.0, hidden=1.0)
    assert Losses(**family("encoder").distill_defaults) == Losses(embedding=1.0, hidden=1.0)
    assert unavailable_loss(family("encoder"), Losses(logits=1.0)) is not None
    assert unavailable_loss(family("encoder"), Losses(embedding=1.0, hidden=0.5)) is None
    with pytest.raises(ValueError, match="losses: a causal LM has no embedding loss"):
        DistillConfig(losses=Losses(embedding=1.0)).check_model(llama_config)
    with pytest.raises(ValueError, match="needs a causal LM"):
        PVTuneConfig().check_model(BertConfig(architectures=["BertModel"]))
    assert PVTuneConfig().check_model(llama_config) is llama_config


def test_registration_rules() -> None:
    encoder = family("encoder")
    with pytest.raises(ValueError, match="already registered"):
        register_family(encoder)
    with pytest.raises(ValueError, match="only one family can be the fallback"):
        register_family(ModelFamily(**{**encoder.__dict__, "name": "other"}))
    with pytest.raises(ValueError, match="unknown loss terms"):
        register_family(ModelFamily(**{**encoder.__dict__, "name": "other", "fallback": False,
                                       "distill_losses": ("contrastive",)}))
    assert "other" not in FAMILIES.names()


# ---- a family of our own, registered for these tests ----

TOY = "toy-encoder"


@pytest.fixture
def toy_family() -> Iterator[list[int]]:
    """An encoder family recognised by a config flag, scored by its own metric and
    evaluator; `forwards` counts the forward passes the latency suite ran."""
    forwards: list[int] = []
    encoder = family("encoder")

    def forward(model: Any, batch: Any) -> Any:
        forwards.append(int(batch["input_ids"].shape[0]))
        return encoder.forward(model, batch)

    def agreement(base: Any, candidate: Any, texts: list[str],
                  settings: suite.EvaluationSettings) -> dict[str, float]:
        base_emb, cand_emb = suite.embed(base, texts, settings), suite.embed(candidate, texts, settings)
        return {"toy_agreement": float((base_emb * cand_emb).sum(-1).mean())}

    register_family(ModelFamily(
        name=TOY, noun="a toy encoder", detect=lambda config: getattr(config, "toy", False),
        auto_class="AutoModel", quality_metric="toy_agreement", evaluator="toy",
        forward=forward, serve=encoder.serve, next_token_logits=False, latency=("forward",),
        distill_losses=("hidden",), distill_defaults={"hidden": 1.0},
    ))
    metric_table.register_metric("toy_agreement", "higher", "cosine", "toy agreement",
                                 quality_for=(TOY,), drop="absolute", reference=1.0,
                                 compares=True)
    suite.QUALITY_EVALUATORS["toy"] = agreement
    yield forwards
    FAMILIES.remove(TOY)
    metric_table.METRICS.remove("toy_agreement")
    del suite.QUALITY_EVALUATORS["toy"]


@pytest.mark.usefixtures("toy_family")
def test_a_registered_family_is_detected() -> None:
    assert detect_family(BertConfig(architectures=["BertModel"], toy=True)).name == TOY
    assert detect_family(BertConfig(architectures=["BertModel"])).name == "encoder"
    assert detect_family(LlamaConfig(architectures=["LlamaForCausalLM"])).name == "causal-lm"
    with pytest.raises(ValueError, match="losses: a toy encoder has no embedding loss; use hidden"):
        DistillConfig(losses=Losses(embedding=1.0)).check_model(BertConfig(toy=True))


def test_a_registered_family_is_evaluated_its_way(toy_family: list[int], tmp_path: Path) -> None:
    model, tokenizer = tiny_bert(seed=0)
    torch.manual_seed(0)
    base = BertModel(model.config).eval()  # with the pooler AutoModel builds on loading
    candidate = copy.deepcopy(base)
    with torch.no_grad():  # a visibly different candidate: its quality must be below 1
        for parameter in candidate.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    base_dir = save_compressed(base, tokenizer, TOY, tmp_path / "base")
    candidate_dir = save_compressed(candidate, tokenizer, TOY, tmp_path / "candidate")
    settings = suite.EvaluationSettings(
        suites=("quality", "latency"), batch_size=4, max_length=16,
        latency=suite.LatencySettings(warmup=0, repeats=2, batch_size=2),
    )
    texts = ["the cat sat on the mat", "a dog ran far away", "birds sing", "rain fell"]
    report = suite.evaluate(base_dir, candidate_dir, texts, settings)
    assert report.kind == TOY
    assert 0.0 < report.metrics["toy_agreement"] < 0.9999
    assert "fidelity_cosine" not in report.metrics and "decode_tokens_per_s" not in report.metrics
    assert len(toy_family) == 4  # base and candidate interleaved, two repeats each, batch 2
    assert set(toy_family) == {2}
    assert quality_score(report.metrics) == report.metrics["toy_agreement"]
