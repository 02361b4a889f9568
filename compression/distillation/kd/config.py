"""The `distill` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig, StrictModel
from squeezeflow.compression.families import ModelFamily, detect_family

Distance = Literal["mse", "cosine"]  # of hidden states or embeddings: mse keeps scale, cosine ignores it


class Losses(StrictModel):
    logits: float = Field(0.0, ge=0)
    hidden: float = Field(0.0, ge=0)
    task: float = Field(0.0, ge=0)
    embedding: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some_loss(self) -> Losses:
        if not any((self.logits, self.hidden, self.task, self.embedding)):
            raise ValueError("every loss weight is 0; give at least one a positive weight")
        return self


def unavailable_loss(family: ModelFamily, losses: Losses) -> str | None:
    """Why `losses` cannot train a model of `family` (a term it has no use for), or None.
    Which terms a family trains with, and its defaults, are in compression/families.py."""
    unavailable = family.unavailable_losses(losses.model_dump())
    if not unavailable:
        return None
    return (f"{family.noun} has no {unavailable[0]} loss; use "
            f"{', '.join(family.distill_losses)} losses")


class DistillConfig(StepConfig):
    kind: Literal["distill"] = "distill"
    needs: ClassVar[Needs] = Needs.TEACHER
    teacher: str = "base"  # "base", models:/NAME/VERSION (or @alias), or a model folder
    losses: Losses | None = None  # None: the model family's distill_defaults (families.py)
    temperature: float = Field(2.0, gt=0)  # Hinton et al. use 2-5; > 1 shows the teacher's runner-up tokens
    hidden_distance: Distance = "mse"  # relative MSE; "cosine" ignores scale
    embedding_distance: Distance = "cosine"  # what retrieval with the embeddings compares
    layer_map: dict[int, int] | None = None  # student block -> teacher block
    project: bool = False  # learn student->teacher width maps when hidden sizes differ
    max_steps: int = Field(200, ge=1)  # a few hundred steps heal a pruned model's first loss
    max_tokens: int | None = Field(None, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    lr: float = Field(1e-4, gt=0)  # fine-tuning rate: the student starts from trained weights
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)  # lets Adam's moment estimates settle
    weight_decay: float = Field(0.0, ge=0)  # short runs from trained weights need none
    grad_clip: float | None = Field(1.0, gt=0)  # caps the first steps' large gradients
    train: Literal["all", "linears", "norms_biases"] = "all"  # linears: the ones targets/ignore select
    keep_sparsity: bool = True  # pruned (zero) weights stay zero, so pruning survives training
    eval_every: int = Field(0, ge=0)  # steps between validations; 0: no validation
    validation_batches: int = Field(1, ge=1)  # held out from training when eval_every > 0
    patience: int = Field(0, ge=0)  # validations without improvement before stopping; 0: never
    min_delta: float = Field(0.0, ge=0)  # an improvement smaller than this does not count
    checkpoint_every: int = Field(50, ge=1)  # steps between resumable checkpoints
    log_every: int = Field(10, ge=1)  # steps per point of the training curves

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.layer_map is not None:
            bad = {s: t for s, t in self.layer_map.items() if s < 0 or t < 0}
            if bad:
                raise ValueError(f"layer_map: block indices must be >= 0, got {bad}")
        if self.patience and not self.eval_every:
            raise ValueError("patience: early stopping needs eval_every > 0")
        return self

    def check_model(self, config: Any) -> Any:
        """The student's side, read from config.json: its blocks and its kind."""
        why = None if self.losses is None else unavailable_loss(detect_family(config), self.losses)
        if why is not None:
            raise ValueError(f"losses: {why}")
        blocks = getattr(config, "num_hidden_layers", None)
        if self.layer_map and isinstance(blocks, int):
            missing = sorted(s for s in self.layer_map if s >= blocks)
            if missing:
                raise ValueError(
                    f"layer_map: student block {missing[0]} does not exist; the student has "
                    f"{blocks} blocks at this stage"
                )
        return config
