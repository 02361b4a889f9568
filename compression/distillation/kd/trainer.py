"""The distillation training loop: budget, schedule, clipping, validation, early
stopping, a resumable checkpoint, and a stop on a non-finite loss.

One `Distiller` trains one student against one teacher. Every `checkpoint_every`
steps it writes `checkpoint.pt` in its folder (student and projection weights,
optimizer, LR schedule, step, tokens, seconds, curves, RNG state) by writing a
temporary file and renaming it, so a process killed at any moment leaves the last
complete checkpoint; a new `Distiller` on the same folder continues from it. The
data order is a function of (seed, epoch), so the resumed run sees the batches the
killed one would have seen.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.distillation.kd import math as kd
from squeezeflow.compression.integrity import atomic_write
from squeezeflow.compression.models import find_blocks
from squeezeflow.compression.progress import advance
from squeezeflow.compression.step import hooks

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]
Progress = Callable[[str], None]
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class Objective:
    """The weighted losses and how student and teacher outputs are compared."""

    logits: float = 0.0
    hidden: float = 0.0
    task: float = 0.0
    embedding: float = 0.0
    temperature: float = 2.0
    hidden_distance: kd.Distance = "mse"
    embedding_distance: kd.Distance = "cosine"
    layer_map: dict[int, int] = field(default_factory=dict)  # student block -> teacher block


@dataclass(frozen=True)
class Schedule:
    """Budget and optimizer settings of one run."""

    max_steps: int
    max_tokens: int | None = None
    max_minutes: float | None = None
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 0.0
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0


@dataclass
class State:
    """Everything about progress that a resumed run must continue from."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_validation: float = math.inf
    best_step: int = -1
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def record(self, name: str, value: float) -> None:
        self.curves.setdefault(name, []).append((self.step, float(value)))


class UpdateHooks:
    """What a step adds to each update of the loop; the base class adds nothing.

    A step whose weights are not plain Parameters (PV-Tuning's integer codes and
    scales) owns their optimizer groups, turns the gradients of the model's weights
    into gradients of those groups after `backward`, writes the model's weights back
    after the optimizer's step, and saves and restores its state with the checkpoint.
    """

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups ({"params": [...], "lr": ...}) besides the trained Parameters."""
        return []

    def after_backward(self) -> None:
        """Called after `loss.backward()`, before gradient clipping and the optimizer."""

    def after_step(self) -> None:
        """Called after the optimizer's step (and the sparsity masks)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (checkpoint resume, rollback, best weights)."""


class Distiller:
    """Trains `student` (in place) to follow `teacher` on `batches`."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        objective: Objective,
        schedule: Schedule,
        trainable: list[nn.Parameter],
        batches: Sequence[Batch],
        validation: Sequence[Batch],
        folder: Path,
        fingerprint: dict[str, Any],
        causal_lm: bool,
        progress: Progress | None = None,
        keep_sparsity: bool = True,
        update_hooks: UpdateHooks | None = None,
        name: str = "distill",  # how log lines and progress messages name the step
    ) -> None:
        self.student, self.teacher = student, teacher
        self.objective, self.schedule = objective, schedule
        self.batches, self.validation = list(batches), list(validation)
        self.folder, self.progress, self.causal_lm = folder, progress, causal_lm
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.projections = self._projections()
        self.hooks, self.name = update_hooks or UpdateHooks(), name
        extra_groups = self.hooks.param_groups()
        self.parameters = trainable + list(self.projections.parameters()) + [
            p for group in extra_groups for p in group["params"]
        ]
        trained = {id(p) for p in trainable}
        # Pruned weights stay pruned: the zeros of each trained Linear weight are re-imposed
        # after every update (weights without zeros need no mask).
        self.masks = {
            id(m.weight): (m.weight, m.weight != 0)
            for m in student.modules()
            if keep_sparsity and isinstance(m, nn.Linear) and id(m.weight) in trained
            and bool((m.weight == 0).any())
        }
        groups = [{"params": trainable + list(self.projections.parameters())}, *extra_groups]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=schedule.lr, weight_decay=schedule.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.state = State()
        self.resumed_from: int | None = None
        self.nan_step: int | None = None
        self._last_logits: Tensor | None = None  # the student's logits of the latest forward

    # ----- the loop -----------------------------------------------------------------

    def run(self) -> State:
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / CHECKPOINT).exists():
            self._load(self.folder / CHECKPOINT)
            self.resumed_from = self.state.step
            self._tell(f"resuming from step {self.state.step} ({self.folder / CHECKPOINT})")
        else:
            (self.folder / BEST).unlink(missing_ok=True)  # never the best of another run
            self._save()  # step 0: a last good checkpoint exists before the first update
        self.teacher.eval()
        self.student.train()
        window: dict[str, list[float]] = {}
        started = time.monotonic() - self.state.seconds
        try:
            with self._capture() as (student_hidden, teacher_hidden):
                while not self._budget_spent(time.monotonic() - started):
                    batch = self._batch(self.state.step)
                    parts = self._losses(batch, student_hidden, teacher_hidden)
                    loss = sum(parts.values(), torch.zeros(()))
                    if not kd.is_finite(loss):
                        self._diverged("loss")
                        window = {}  # those steps were rolled back
                        break
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.hooks.after_backward()
                    clip = self.schedule.grad_clip or math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, clip)
                    if not kd.is_finite(grad_norm):
                        self._diverged("gradient norm")
                        window = {}  # those steps were rolled back
                        break
                    self.optimizer.step()
                    with torch.no_grad():
                        for weight, mask in self.masks.values():
                            weight.mul_(mask)
                    self.hooks.after_step()
                    self.scheduler.step()
                    self.state.step += 1
                    self.state.tokens += int(batch["attention_mask"].sum())
                    self.state.seconds = time.monotonic() - started
                    window.setdefault("loss", []).append(float(loss.detach()))
                    advance(f"{self.name} steps", self.state.step, self.schedule.max_steps,
                            f"loss {window['loss'][-1]:.4f}")
                    window.setdefault("grad_norm", []).append(float(grad_norm))
                    for name, value in parts.items():
                        window.setdefault(f"loss.{name}", []).append(float(value.detach()))
                    if self.state.step % self.schedule.log_every == 0 or self._budget_spent(self.state.seconds):
                        self._log_window(window)
                        window = {}
                    if self.schedule.eval_every and self.state.step % self.schedule.eval_every == 0:
                        self._validate(student_hidden, teacher_hidden)
                        if self.state.stopped_early:
                            break
                    if self.state.step % self.schedule.checkpoint_every == 0:
                        self._save()
            if window:
                self._log_window(window)
            advance(f"{self.name} steps", self.state.step, self.state.step)  # ended (budget or stop)
            last_validated = max((s for s, _ in self.state.curves.get("validation_loss", [])), default=-1)
            if self.nan_step is None and self.schedule.eval_every and last_validated < self.state.step:
                with self._capture() as (student_hidden, teacher_hidden):
                    self._validate(student_hidden, teacher_hidden)  # the final weights, too
        finally:
            self.student.eval()
        if self.nan_step is None:
            self._save()
            if self.validation and (self.folder / BEST).exists():
                # the weights that validated best, not the last ones (early stopping)
                saved = torch.load(self.folder / BEST, weights_only=True)
                self.student.load_state_dict(saved["student"])
                self.hooks.load_state_dict(saved["hooks"])
        return self.state

    def _budget_spent(self, seconds: float) -> bool:
        s = self.schedule
        return (
            self.state.step >= s.max_steps
            or (s.max_tokens is not None and self.state.tokens >= s.max_tokens)
            or (s.max_minutes is not None and seconds >= 60 * s.max_minutes)
        )

    def _batch(self, step: int) -> Batch:
        """Batch for `step`: epoch e visits the batches in a permutation seeded by (seed, e)."""
        epoch, position = divmod(step, len(self.batches))
        generator = torch.Generator().manual_seed(self.schedule.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.batches), generator=generator)
        return self.batches[int(order[position])]

    def _lr_factor(self, step: int) -> float:
        s = self.schedule
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.schedule == "constant":
            return 1.0
        progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
        progress = min(progress, 1.0)
        if s.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # ----- losses ---------------------------------------------------------------------

    def _losses(self, batch: Batch, student_hidden: dict[int, Tensor],
                teacher_hidden: dict[int, Tensor]) -> dict[str, Tensor]:
        """Weighted loss terms of one batch (only those with a weight above zero)."""
        o = self.objective
        mask = batch["attention_mask"]  # (batch, seq)
        with torch.no_grad():
            teacher_out = self.teacher(**batch, **self._no_cache(self.teacher))
        student_out = self.student(**batch, **self._no_cache(self.student))
        parts: dict[str, Tensor] = {}
        if o.logits:
            parts["logits"] = o.logits * kd.logit_kd(
                student_out.logits, teacher_out.logits, mask, o.temperature
            )
        if o.task:
            parts["task"] = o.task * kd.lm_loss(student_out.logits, batch["input_ids"], mask)[0]
        if o.hidden:
            terms = [
                kd.hidden_kd(self._project(str(s), student_hidden[s]), teacher_hidden[t], mask,
                             o.hidden_distance)
                for s, t in o.layer_map.items()
            ]
            parts["hidden"] = o.hidden * torch.stack(terms).mean()
        if o.embedding:
            student_embedding = kd.mean_pool(student_out.last_hidden_state, mask)  # (batch, hidden)
            teacher_embedding = kd.mean_pool(teacher_out.last_hidden_state, mask)
            parts["embedding"] = o.embedding * kd.embedding_kd(
                self._project("embedding", student_embedding), teacher_embedding,
                o.embedding_distance,
            )
        self._last_logits = student_out.logits if self.causal_lm else None
        return parts

    def _validate(self, student_hidden: dict[int, Tensor], teacher_hidden: dict[int, Tensor]) -> None:
        if not self.validation:
            return
        self.student.eval()
        total, weight, nll, predicted = 0.0, 0, 0.0, 0
        with torch.no_grad():
            for batch in self.validation:
                parts = self._losses(batch, student_hidden, teacher_hidden)
                tokens = int(batch["attention_mask"].sum())
                total += float(sum(parts.values(), torch.zeros(()))) * tokens
                weight += tokens
                if self._last_logits is not None:
                    loss, count = kd.lm_loss(self._last_logits, batch["input_ids"],
                                             batch["attention_mask"])
                    nll += float(loss) * count
                    predicted += count
        self.student.train()
        value = total / max(weight, 1)
        self.state.record("validation_loss", value)
        if predicted:
            self.state.record("validation_perplexity", math.exp(nll / predicted))
        self._tell(f"step {self.state.step}: validation loss {value:.4f}")
        if value < self.state.best_validation - self.schedule.min_delta:
            self.state.best_validation, self.state.best_step = value, self.state.step
            self.state.evaluations_without_improvement = 0
            self._write({"student": self.student.state_dict(), "hooks": self.hooks.state_dict()}, BEST)
        else:
            self.state.evaluations_without_improvement += 1
            if self.schedule.patience and (
                self.state.evaluations_without_improvement >= self.schedule.patience
            ):
                self.state.stopped_early = True
                self._tell(f"early stop at step {self.state.step}: no improvement in "
                           f"{self.schedule.patience} evaluations (best at step {self.state.best_step})")

    def _diverged(self, what: str) -> None:
        """Stop: the student goes back to the last good checkpoint, which stays on disk."""
        self.nan_step = self.state.step + 1
        checkpoint = self.folder / CHECKPOINT
        self._load(checkpoint)
        log.error("%s: %s is not finite at step %d; training stopped, the student is the "
                  "last good checkpoint (step %d, %s)", self.name, what, self.nan_step, self.state.step,
                  checkpoint)
        self._tell(f"non-finite {what} at step {self.nan_step}; kept the checkpoint of step {self.state.step}")

    # ----- hidden states --------------------------------------------------------------

    @contextmanager
    def _capture(self) -> Iterator[tuple[dict[int, Tensor], dict[int, Tensor]]]:
        """Record the outputs of the mapped blocks of student and teacher on every forward."""
        student_hidden: dict[int, Tensor] = {}
        teacher_hidden: dict[int, Tensor] = {}
        handles = []
        if self.objective.hidden:
            _, student_blocks = find_blocks(self.student)
            _, teacher_blocks = find_blocks(self.teacher)
            for s, t in self.objective.layer_map.items():
                handles.append(student_blocks[s].register_forward_hook(_recorder(student_hidden, s)))
                handles.append(teacher_blocks[t].register_forward_hook(_recorder(teacher_hidden, t)))
        with hooks(handles):
            yield student_hidden, teacher_hidden

    def _projections(self) -> nn.ModuleDict:
        """Learned maps from student to teacher width where they differ (dropped after training)."""
        student_width = model_config(self.student).hidden_size
        teacher_width = model_config(self.teacher).hidden_size
        projections = nn.ModuleDict()
        if student_width == teacher_width:
            return projections
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.schedule.seed)
        names = [str(s) for s in self.objective.layer_map] if self.objective.hidden else []
        names += ["embedding"] if self.objective.embedding else []
        for name in names:
            projections[name] = nn.Linear(student_width, teacher_width, bias=False)
        torch.set_rng_state(generator_state)
        return projections

    def _project(self, name: str, hidden: Tensor) -> Tensor:
        return self.projections[name](hidden) if name in self.projections else hidden

    @staticmethod
    def _no_cache(model: nn.Module) -> dict[str, bool]:
        """`use_cache=False` where the model takes it: a KV cache is useless in training."""
        return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    # ----- checkpoints ----------------------------------------------------------------

    def _save(self) -> None:
        self._write({
            "fingerprint": self.fingerprint,
            "student": self.student.state_dict(),
            "projections": self.projections.state_dict(),
            "hooks": self.hooks.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": {**self.state.__dict__, "curves": {k: [list(p) for p in v]
                                                         for k, v in self.state.curves.items()}},
            "rng": torch.get_rng_state(),
        }, CHECKPOINT)

    def _load(self, path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        if saved["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{path} was written by a different distillation (other settings, data or "
                "models); remove it to start over"
            )
        self.student.load_state_dict(saved["student"])
        self.projections.load_state_dict(saved["projections"])
        self.hooks.load_state_dict(saved["hooks"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state = dict(saved["state"])
        state["curves"] = {k: [(int(s), float(v)) for s, v in points]
                           for k, points in state["curves"].items()}
        self.state = State(**state)
        torch.set_rng_state(saved["rng"])

    def _write(self, payload: dict[str, Any], name: str) -> None:
        """Write whole or not at all: a temporary file renamed over the old one."""
        with atomic_write(self.folder / name, "wb") as handle:  # a unique temporary name
            torch.save(payload, handle)

    def _log_window(self, window: dict[str, list[float]]) -> None:
        for name, values in window.items():
            self.state.record(name, sum(values) / len(values))
        self.state.record("lr", float(self.scheduler.get_last_lr()[0]))
        loss = sum(window["loss"]) / len(window["loss"]) if window.get("loss") else float("nan")
        self._tell(f"step {self.state.step}/{self.schedule.max_steps}: loss {loss:.4f}, "
                   f"lr {self.scheduler.get_last_lr()[0]:.2e}, {self.state.tokens} tokens")

    def _tell(self, message: str) -> None:
        log.info("%s: %s", self.name, message)
        if self.progress is not None:
            self.progress(f"{self.name} {message}")


def model_config(model: nn.Module) -> Any:
    """A Hugging Face model's config (typed loosely: every model family has its own class)."""
    return model.config


def _recorder(store: dict[int, Tensor], index: int) -> Callable[..., None]:
    def record(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store[index] = output[0] if isinstance(output, tuple | list) else output

    return record
