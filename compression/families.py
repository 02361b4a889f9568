"""Model families: what kind of model a checkpoint is, and everything that follows.

A family (`ModelFamily`) says, in one place:
- how to recognise it from a transformers config (`detect`),
- which Auto class builds and loads it (`auto_class`),
- how it is evaluated: its headline quality metric (a name in the metric table,
  `evaluation/metrics.py`) and the quality evaluator that measures it (a name
  registered in `evaluation/suite.py`),
- how it runs and is served: one forward as its users run it (`forward`: pooled
  embeddings, or logits without the KV cache) and what the registry's pyfunc
  `predict` returns (`serve`),
- whether it has next-token logits (`next_token_logits`: logit distillation, PV-tuning
  and decode latency need them) and which latency workloads it is timed on,
- its distillation losses: which terms it can train with and the default weights.

Two families are built in: `encoder` (embeddings by mean pooling, as
sentence-transformers does for all-MiniLM-L6-v2) and `causal-lm` (perplexity,
generation). Code asks `detect_family(config)` or `family(name)` instead of comparing
kind strings; a new family is one `register_family(...)` call.

Why a module of its own and not `compression/models.py`: models.py is about sources
(the bundled default, folders, hub ids) and imports transformers at its top; this
table is read by recipe validation and the CLI, so it stays free of heavy imports
(transformers and torch are imported inside the functions that use them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor, nn

Workload = Literal["forward", "decode"]
# the loss terms of `distill` (compression/distillation/kd/step.py: Losses)
LOSS_TERMS = ("logits", "hidden", "task", "embedding")
Batch = Mapping[str, "Tensor"]  # tokenizer output: input_ids, attention_mask, ...


class UnknownFamilyError(ValueError):
    """A model family name that is not registered."""


@dataclass(frozen=True)
class ModelFamily:
    name: str  # what recipes, artifacts and run records call it ("kind")
    noun: str  # in messages: "an encoder", "a causal LM"
    detect: Callable[[Any], bool]  # config -> whether this family; see FamilyTable.detect
    auto_class: str  # the transformers Auto class that builds and loads it
    quality_metric: str  # headline quality metric, a name in evaluation/metrics.py
    evaluator: str  # quality evaluator registered in evaluation/suite.py
    forward: Callable[[nn.Module, Batch], Any]  # one forward as the family's users run it
    serve: Callable[[nn.Module, Any, Batch, Mapping[str, Any]], Any]  # pyfunc predict
    next_token_logits: bool  # logit distillation, PV-tuning and decoding need them
    latency: tuple[Workload, ...]  # what the latency suite times
    distill_losses: tuple[str, ...]  # loss terms of `distill` this family can train with
    distill_defaults: Mapping[str, float] = field(default_factory=dict)  # without `losses:`
    fallback: bool = False  # chosen when no other family's `detect` matches

    def model_class(self) -> Any:  # an Auto* class: from_pretrained / from_config
        import transformers

        return getattr(transformers, self.auto_class)

    def unavailable_losses(self, weights: Mapping[str, float]) -> list[str]:
        """Loss terms given a positive weight that this family cannot train with."""
        return [term for term in LOSS_TERMS
                if weights.get(term) and term not in self.distill_losses]


class FamilyTable:
    """Registered model families by name. One instance lives in this module (`FAMILIES`)."""

    def __init__(self) -> None:
        self._families: dict[str, ModelFamily] = {}

    def add(self, entry: ModelFamily) -> ModelFamily:
        if entry.name in self._families:
            raise ValueError(f"model family {entry.name!r} is already registered")
        if entry.fallback and any(f.fallback for f in self._families.values()):
            raise ValueError(f"model family {entry.name!r}: only one family can be the fallback")
        unknown = sorted(set(entry.distill_losses) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"model family {entry.name!r}: unknown loss terms {unknown}; "
                             f"known: {', '.join(LOSS_TERMS)}")
        self._families[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister `name` (tests registering a temporary family)."""
        self._families.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._families)

    def entries(self) -> list[ModelFamily]:
        """Every family, in registration order."""
        return list(self._families.values())

    def __getitem__(self, name: str) -> ModelFamily:
        if name not in self._families:
            raise UnknownFamilyError(
                f"unknown model family {name!r}; known families: {', '.join(self.names())}"
            )
        return self._families[name]

    def detect(self, config: Any) -> ModelFamily:
        """The family of the model `config` describes: the first family registered
        (not the fallback) whose `detect` matches, else the fallback family."""
        for entry in self._families.values():
            if not entry.fallback and entry.detect(config):
                return entry
        for entry in self._families.values():
            if entry.fallback:
                return entry
        raise UnknownFamilyError(
            f"no model family recognises {type(config).__name__} "
            f"(architectures {getattr(config, 'architectures', None)}); "
            f"known families: {', '.join(self.names())}"
        )


FAMILIES = FamilyTable()


def register_family(entry: ModelFamily) -> ModelFamily:
    """Add a family; a name registered twice is an error."""
    return FAMILIES.add(entry)


def family(name: str) -> ModelFamily:
    """The family called `name`; an unknown name is an error naming the known ones."""
    return FAMILIES[name]


def detect_family(config: Any) -> ModelFamily:
    return FAMILIES.detect(config)


# ---- the built-in families ----

def _is_causal_lm(config: Any) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return True
    return bool(getattr(config, "is_decoder", False))


def _pooled_embeddings(model: nn.Module, batch: Batch) -> Tensor:
    from squeezeflow.compression.models import mean_pooled_embeddings

    return mean_pooled_embeddings(model, batch["input_ids"], batch["attention_mask"])


def _logits_without_cache(model: nn.Module, batch: Batch) -> Any:
    return model(**batch, use_cache=False)  # no KV cache: the whole sequence, as in prefill


def _serve_embeddings(model: nn.Module, tokenizer: Any, batch: Batch,
                      params: Mapping[str, Any]) -> Any:
    """Sentence embeddings as a numpy array (n, hidden)."""
    return _pooled_embeddings(model, batch).numpy()


MAX_NEW_TOKENS = 20  # pyfunc default: a short completion; `params={"max_new_tokens": n}`


def _serve_generate(model: nn.Module, tokenizer: Any, batch: Batch,
                    params: Mapping[str, Any]) -> Any:
    """Greedy completions of the texts, decoded to strings."""
    max_new_tokens = int(params.get("max_new_tokens", MAX_NEW_TOKENS))
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


# Encoders are used through their pooled embeddings, so fidelity of those embeddings
# to the base's is their quality, and the embeddings are the distillation target.
register_family(ModelFamily(
    name="encoder", noun="an encoder", detect=lambda config: True, fallback=True,
    auto_class="AutoModel", quality_metric="fidelity_cosine", evaluator="fidelity",
    forward=_pooled_embeddings, serve=_serve_embeddings, next_token_logits=False,
    latency=("forward",), distill_losses=("embedding", "hidden"),
    distill_defaults={"embedding": 1.0, "hidden": 1.0},
))
# Causal LMs: perplexity is their quality; logits carry most of what they know, and
# hidden KD guides the blocks left after pruning.
register_family(ModelFamily(
    name="causal-lm", noun="a causal LM", detect=_is_causal_lm,
    auto_class="AutoModelForCausalLM", quality_metric="perplexity", evaluator="perplexity",
    forward=_logits_without_cache, serve=_serve_generate, next_token_logits=True,
    latency=("forward", "decode"), distill_losses=("logits", "hidden", "task"),
    distill_defaults={"logits": 1.0, "hidden": 1.0},
))
