"""`distill`: train the model as it stands (the student) to follow a teacher.

The teacher is the recipe's base model (`teacher: base`), a registered version
(`models:/NAME/VERSION`) or a model folder; the stage gets its folder from the flow.
Losses (weights per term; a term with weight 0 is not computed):
- `logits`: KL of temperature-softened next-token distributions (causal LMs);
- `hidden`: student block outputs follow the teacher blocks named by `layer_map`
  (student block -> teacher block; default: evenly spaced, last to last);
- `task`: the LM loss on the training text (causal LMs);
- `embedding`: mean-pooled sentence embeddings follow the teacher's (encoders).
Without `losses`, causal LMs use logits + hidden, encoders embedding + hidden.
Training data is the recipe's `training:` section; the last `validation_batches`
of it are held out for `eval_every` and early stopping (`patience`). The run stops
at the first of `max_steps`, `max_tokens`, `max_minutes`; a killed run resumes
from its last checkpoint (every `checkpoint_every` steps). A non-finite loss stops
training and keeps the last good checkpoint (metric `nan_step` says where). Weights
pruned to zero by earlier stages stay zero (`keep_sparsity`).

```yaml
- kind: distill
  max_steps: 200
  lr: 1.0e-4
- kind: distill
  teacher: models:/tiny-llama/1
  losses: {logits: 1.0, hidden: 0.5, task: 0.1}
  temperature: 2.0
  layer_map: {0: 1, 1: 3}
  max_steps: 1000
  max_minutes: 30
  eval_every: 50
  patience: 3
  train: norms_biases
- kind: distill
  losses: {embedding: 1.0, hidden: 1.0}
  embedding_distance: cosine
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from squeezeflow.compression.artifact import load_compressed
from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.distillation.kd.config import DistillConfig, Losses, unavailable_loss
from squeezeflow.compression.distillation.kd.math import even_layer_map
from squeezeflow.compression.distillation.kd.trainer import (
    Distiller,
    Objective,
    Schedule,
    model_config,
)
from squeezeflow.compression.families import detect_family
from squeezeflow.compression.formats import FORMATS
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.quantization.qweight import QUANTIZED_ATTR
from squeezeflow.compression.step import Step, StepReport, TrainingContext

log = logging.getLogger(__name__)

NORM_TYPES = ("LayerNorm", "RMSNorm")  # class-name suffixes of normalization layers
BUDGET_FIELDS = {"max_steps", "max_tokens", "max_minutes", "checkpoint_every", "log_every"}


@register_step(DistillConfig)
class DistillStep(Step[DistillConfig]):
    def accepts(self, module: nn.Module) -> bool:
        """For `train: linears`: Linears, and modules computing their weight from a stored
        value they train themselves (RPS: the shared z and the layer's scale)."""
        return isinstance(module, nn.Linear) or (
            not isinstance(getattr(module, "weight", None), nn.Parameter)
            and FORMATS.current(module) is not None
        )

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        raise NotImplementedError("distill trains the model: runners call train(), which needs a teacher")

    def train(
        self, model: nn.Module, context: TrainingContext, progress: Callable[[str], None] | None = None
    ) -> StepReport:
        c = self.config
        teacher = load_teacher(context, "distill")
        family = detect_family(model_config(model))
        losses = c.losses or Losses(**family.distill_defaults)
        layer_map = check_pair(teacher, model, losses, c.layer_map, c.project, str(context.teacher))
        quantized = [name for name, m in model.named_modules() if getattr(m, QUANTIZED_ATTR, None)]
        if quantized:
            raise ValueError(
                f"distill: the student has quantized Linears ({quantized[0]}, ...); training would "
                "store them dense. Put the distill stage before quantization stages"
            )
        trainable = self._trainable(model)
        batches = list(context.batches)
        held_out = c.validation_batches if c.eval_every and len(batches) > c.validation_batches else 0
        train_batches = batches[: len(batches) - held_out]
        validation = batches[len(batches) - held_out :]
        objective = Objective(
            logits=losses.logits, hidden=losses.hidden, task=losses.task, embedding=losses.embedding,
            temperature=c.temperature, hidden_distance=c.hidden_distance,
            embedding_distance=c.embedding_distance, layer_map=layer_map,
        )
        schedule = Schedule(
            max_steps=c.max_steps, max_tokens=c.max_tokens, max_minutes=c.max_minutes, lr=c.lr,
            schedule=c.schedule, warmup_steps=c.warmup_steps, weight_decay=c.weight_decay,
            grad_clip=c.grad_clip, eval_every=c.eval_every, patience=c.patience,
            min_delta=c.min_delta, checkpoint_every=c.checkpoint_every, log_every=c.log_every,
            seed=context.seed,
        )
        # A checkpoint resumes only the same run; a larger budget continues it.
        fingerprint = {
            "config": c.model_dump(mode="json", exclude=BUDGET_FIELDS), "seed": context.seed,
            "batches": len(batches),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "student_parameters": sum(p.numel() for p in model.parameters()),
        }
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        try:
            distiller = Distiller(
                model, teacher, objective, schedule, trainable, train_batches, validation,
                context.folder, fingerprint, causal_lm=family.next_token_logits, progress=progress,
                keep_sparsity=c.keep_sparsity,
            )
            state = distiller.run()
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(requires_grad[name])
        metrics = {
            "steps": float(state.step),
            "tokens": float(state.tokens),
            "train_seconds": state.seconds,
            "trainable_parameters": float(sum(p.numel() for p in trainable)),
            "resumed_from_step": float(distiller.resumed_from or 0),
            "stopped_early": float(state.stopped_early),
        }
        for name in ("loss", "validation_loss", "validation_perplexity"):
            if state.curves.get(name):
                metrics[f"final_{name}"] = state.curves[name][-1][1]
        if state.best_step >= 0:
            metrics["best_validation_loss"] = state.best_validation
            metrics["best_step"] = float(state.best_step)
        if distiller.nan_step is not None:
            metrics["nan_step"] = float(distiller.nan_step)
        return StepReport(kind=c.kind, metrics=metrics, curves=state.curves)

    def _trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters to train, each once (shared blocks hold one Parameter in several places)."""
        if self.config.train == "all":
            chosen = list(model.parameters())
        elif self.config.train == "linears":
            chosen = [p for m in self.select(model).values() for p in m.parameters(recurse=False)]
        else:
            chosen = [
                p for name, m in model.named_modules() for pname, p in m.named_parameters(recurse=False)
                if type(m).__name__.endswith(NORM_TYPES) or pname == "bias"
            ]
        unique = list({id(p): p for p in chosen}.values())
        if not unique:
            raise ValueError(f"train: {self.config.train!r} selects no parameter of this model")
        return unique


def describe(model: nn.Module, role: str, name: str = "") -> str:
    config = model_config(model)
    _, blocks = find_blocks(model)
    where = f" {name}" if name else ""
    return (f"{role}{where} ({config.model_type}, {len(blocks)} blocks, hidden "
            f"{config.hidden_size}, vocabulary {config.vocab_size})")


def load_teacher(context: TrainingContext, kind: str) -> nn.Module:
    """The frozen teacher of a training step, after checking it has a teacher and data."""
    if context.teacher is None:
        raise ValueError(f"{kind} needs a teacher model folder, and none was given")
    if not context.batches:
        raise ValueError(f"{kind} needs training data, and none was given")
    teacher = load_compressed(context.teacher).model
    teacher.requires_grad_(False)
    return teacher


def check_pair(
    teacher: nn.Module, student: nn.Module, losses: Losses, layer_map: dict[int, int] | None,
    project: bool, teacher_name: str = "",
) -> dict[int, int]:
    """Fail before training when teacher and student cannot be paired; the layer map to use."""
    both = f"{describe(teacher, 'teacher', teacher_name)} and {describe(student, 'student')}"
    teacher_config, student_config = model_config(teacher), model_config(student)
    teacher_family, student_family = detect_family(teacher_config), detect_family(student_config)
    if teacher_family.name != student_family.name:
        raise ValueError(f"cannot distill: {both}: one is a {teacher_family.name}, "
                         f"the other a {student_family.name}")
    if teacher_config.vocab_size != student_config.vocab_size:
        raise ValueError(f"cannot distill: {both} have different vocabularies; "
                         "they must share one tokenizer")
    why = unavailable_loss(student_family, losses)
    if why is not None:
        raise ValueError(f"losses: {both}: {why}")
    widths_differ = teacher_config.hidden_size != student_config.hidden_size
    if widths_differ and (losses.hidden or losses.embedding) and not project:
        raise ValueError(f"cannot distill: {both} have different hidden sizes; set project: true "
                         "to learn a projection, or drop the hidden/embedding losses")
    _, teacher_blocks = find_blocks(teacher)
    _, student_blocks = find_blocks(student)
    chosen = layer_map if layer_map is not None else even_layer_map(len(student_blocks), len(teacher_blocks))
    for s, t in sorted(chosen.items()):
        if s >= len(student_blocks):
            raise ValueError(f"layer_map: student block {s} does not exist: {both}")
        if t >= len(teacher_blocks):
            raise ValueError(f"layer_map: teacher block {t} does not exist: {both}")
    if losses.hidden and not chosen:
        raise ValueError("layer_map: empty, but the hidden loss has weight > 0")
    return dict(chosen)
