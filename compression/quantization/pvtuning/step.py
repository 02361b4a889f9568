"""`pv_tune`: PV-Tuning of an integer-quantized model against its teacher's logits.

Malinovskii et al. 2024 (see `math.py`). Runs after a quantization stage (`rtn`,
`gptq`, ...) on the Linears whose integer codes are still current. Each training step
is a V step (Adam with `v_lr` on the scales and on the parameters `unquantized`
selects: norms, biases, embeddings, the head) and a P step (Adam with `p_lr` on a
full-precision buffer per quantized weight; of each weight at most the fraction `tau`
of the codes move, to the grid point nearest their buffer: those whose move brings the
weight closest to the buffer; the other codes stay). `tau: 1.0` re-rounds every code
every step: straight-through estimation, the baseline; `codes: false` keeps every code
(V steps only). Zero points are integers of the format (and the middle of the grid for
symmetric grids); they stay as they are. Bits, group size, symmetry and `g_idx` stay
too, so the result saves and packs like its input; scales are kept in fp32 while
training and rounded to the fp16 they are stored in at the end.

The loss is KL(teacher || student) of the next-token distributions (Hinton et al.
2015 at `temperature`). The teacher is the recipe's base model (`teacher: base`), a
registered version (`models:/NAME/VERSION`) or a model folder. Training reuses the
distillation loop: budget (`max_steps`, `max_tokens`, `max_minutes`), schedule,
validation (`eval_every`) and early stopping (`patience`), a checkpoint every
`checkpoint_every` steps that a killed run resumes from (codes, scales and buffers
included), curves every `log_every` steps.

```yaml
- kind: pv_tune
  max_steps: 200
  tau: 0.01
- kind: pv_tune
  codes: false         # V steps only: scales and unquantized parameters
- kind: pv_tune
  teacher: models:/tiny-llama/1
  tau: 1.0             # straight-through estimation: every code re-rounded every step
  v_lr: 1.0e-4
  p_lr: 1.0e-3
  unquantized: norms_biases
  max_minutes: 30
  eval_every: 50
  patience: 3
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.distillation.kd.step import (
    NORM_TYPES,
    Losses,
    check_pair,
    load_teacher,
)
from squeezeflow.compression.distillation.kd.trainer import (
    Distiller,
    Objective,
    Schedule,
    UpdateHooks,
    model_config,
)
from squeezeflow.compression.families import detect_family
from squeezeflow.compression.formats import FORMATS
from squeezeflow.compression.quantization.pvtuning import math as pv
from squeezeflow.compression.quantization.pvtuning.config import PVTuneConfig
from squeezeflow.compression.quantization.qweight import (
    QUANTIZED_ATTR,
    QuantizedWeight,
    as_stored,
    attach,
    current_quantized,
)
from squeezeflow.compression.step import Step, StepReport, TrainingContext

log = logging.getLogger(__name__)

BUDGET_FIELDS = {"max_steps", "max_tokens", "max_minutes", "checkpoint_every", "log_every"}
SMALLEST_SCALE = 2.0**-24  # the smallest positive fp16: a V step never collapses or flips a grid
# The P step's Adam keeps no momentum (the authors' code_beta1 = 0, code_beta2 = 0.95):
# a buffer stops as soon as its gradient turns, instead of carrying codes past their
# best point. On the 2-bit test LM (200 steps, p_lr 1e-2) perplexity 2.778 vs 2.810 with
# Adam's default (0.9, 0.999) from RTN, 2.783 vs 2.794 from GPTQ (benchmarks/README.md).
P_BETAS = (0.0, 0.95)
LOSSES = Losses(logits=1.0)  # PV-Tuning's objective: the teacher's next-token distribution


@dataclass
class TunedWeight:
    """One quantized weight under PV-Tuning: its codes C, scales s and buffer Y."""

    name: str  # the first module carrying it
    modules: tuple[nn.Module, ...]  # every module whose weight is this Parameter
    weight: nn.Parameter  # the model's weight: holds dequantize(C, s) in the module's layout
    stored: QuantizedWeight  # the format it came as (zero points, g_idx, bits, ...)
    C: Tensor  # (out, in) codes, changed in place by P steps
    s: nn.Parameter  # (out, groups) fp32 scales, trained by V steps
    Y: nn.Parameter  # (out, in) fp32 buffer, trained by P steps
    C0: Tensor  # (out, in) the codes it started from

    def dequantized(self) -> Tensor:
        q = self.stored
        return pv.dequantize(self.C, self.s.detach(), q.zero, q.g_idx, q.input_scale)  # (out, in)

    def write(self) -> None:
        """The model's weight := dequantize(C, s) (every module shares the Parameter)."""
        self.weight.data.copy_(as_stored(self.modules[0], self.dequantized()))


class GridTuner(UpdateHooks):
    """PV-Tuning's V-step scales and P-step buffers and codes, inside the distillation loop."""

    def __init__(self, weights: list[TunedWeight], tau: float, v_lr: float, p_lr: float,
                 scales: bool, codes: bool) -> None:
        self.weights, self.tau, self.v_lr, self.p_lr = weights, tau, v_lr, p_lr
        self.train_scales, self.train_codes = scales, codes
        self.most_changed = 0.0  # largest fraction of one weight's codes a P step changed

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        if self.train_codes:
            groups.append({"params": [w.Y for w in self.weights], "lr": self.p_lr, "betas": P_BETAS})
        if self.train_scales:
            groups.append({"params": [w.s for w in self.weights], "lr": self.v_lr})
        return groups

    def after_backward(self) -> None:
        """G = d phi / d W_hat (from backward) -> the buffer's gradient and the scales'."""
        for w in self.weights:
            grad = w.weight.grad
            q = w.stored
            G = torch.zeros_like(w.Y) if grad is None else as_stored(w.modules[0], grad).float()
            if self.train_codes:
                w.Y.grad = G.clone()  # (out, in): the P step's buffer follows the weight's gradient
            if self.train_scales:
                w.s.grad = pv.scale_gradient(G, w.C, q.zero, q.g_idx, w.s.shape[1], q.input_scale)
            w.weight.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        """V step done (scales moved): the P step re-rounds, the weights are rewritten."""
        for w in self.weights:
            q = w.stored
            w.s.clamp_(min=SMALLEST_SCALE)
            if not self.train_codes:
                w.write()
                continue
            W_hat = w.dequantized()  # (out, in): current codes on the updated grid
            new = pv.p_step(w.C, w.Y.detach(), W_hat, w.s.detach(), q.zero, q.g_idx, q.bits,
                            self.tau, q.input_scale)
            changed = int((new != w.C).sum())
            self.most_changed = max(self.most_changed, changed / w.C.numel())
            w.C.copy_(new)
            w.write()

    def state_dict(self) -> dict[str, Any]:
        return {
            "codes": {w.name: w.C.clone() for w in self.weights},
            "scales": {w.name: w.s.detach().clone() for w in self.weights},
            "buffers": {w.name: w.Y.detach().clone() for w in self.weights},
            "most_changed": self.most_changed,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for w in self.weights:
            w.C.copy_(state["codes"][w.name])
            w.s.copy_(state["scales"][w.name])
            w.Y.copy_(state["buffers"][w.name])
            w.write()
        self.most_changed = float(state["most_changed"])

    def finish(self) -> dict[str, dict[str, float]]:
        """Attach the tuned codes and fp16-stored scales; per-weight change metrics."""
        per_module = {}
        for w in self.weights:
            scale = w.s.detach().to(torch.float16).to(torch.float32)  # what is stored is what is used
            tuned = replace(w.stored, codes=w.C.clone(), scale=scale.contiguous())
            for module in w.modules:
                attach(module, tuned)
            before = w.stored.dequantize()  # (out, in)
            change = (tuned.dequantize() - before).norm() / before.norm().clamp(min=1e-12)
            per_module[w.name] = {
                "codes_changed": float((w.C != w.C0).float().mean()),
                "weight_rel_change": float(change),
            }
        return per_module


@register_step(PVTuneConfig)
class PVTuneStep(Step[PVTuneConfig]):
    def accepts(self, module: nn.Module) -> bool:
        """Linear layers and GPT-2's Conv1D (a Linear with its weight stored transposed)."""
        return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        raise NotImplementedError("pv_tune trains the model: runners call train(), which needs a teacher")

    def train(
        self, model: nn.Module, context: TrainingContext, progress: Callable[[str], None] | None = None
    ) -> StepReport:
        c = self.config
        teacher = load_teacher(context, "pv_tune")
        if not detect_family(model_config(model)).next_token_logits:
            raise ValueError("pv_tune distills next-token distributions; it needs a causal LM")
        check_pair(teacher, model, LOSSES, {}, False, str(context.teacher))
        weights = self._tuned_weights(model)
        if not weights:
            log.warning("pv_tune: no selected Linear has current integer codes (run rtn or gptq "
                        "first); only the continuous parameters train")
        trainable = self._unquantized(model)
        if not trainable and not (weights and (c.codes or c.scales)):
            raise ValueError(f"unquantized: {c.unquantized!r} selects no parameter, and there are "
                             "no codes or scales to tune (no integer-quantized Linear, or "
                             "codes and scales both false)")
        tuner = GridTuner(weights, c.tau, c.v_lr, c.p_lr, c.scales, c.codes)
        batches = list(context.batches)
        held_out = c.validation_batches if c.eval_every and len(batches) > c.validation_batches else 0
        schedule = Schedule(
            max_steps=c.max_steps, max_tokens=c.max_tokens, max_minutes=c.max_minutes, lr=c.v_lr,
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
            "tuned": [w.name for w in weights],
        }
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        for parameter in [*trainable, *(w.weight for w in weights)]:
            parameter.requires_grad_(True)  # quantized weights: for their gradient G only
        try:
            distiller = Distiller(
                model, teacher, Objective(logits=LOSSES.logits, temperature=c.temperature),
                schedule, trainable,
                batches[: len(batches) - held_out], batches[len(batches) - held_out :],
                context.folder, fingerprint, causal_lm=True, progress=progress,
                keep_sparsity=c.keep_sparsity, update_hooks=tuner, name="pv_tune",
            )
            state = distiller.run()
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(requires_grad[name])
                parameter.grad = None
        per_module = tuner.finish()
        codes = sum(w.C.numel() for w in weights)
        metrics = {
            "steps": float(state.step),
            "tokens": float(state.tokens),
            "train_seconds": state.seconds,
            "trainable_parameters": float(sum(p.numel() for p in trainable)),
            "tuned_weights": float(len(weights)),
            "codes": float(codes),
            "codes_changed": sum(m["codes_changed"] * w.C.numel()
                                 for m, w in zip(per_module.values(), weights, strict=True)) / max(codes, 1),
            "max_codes_changed_per_step": tuner.most_changed,
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
        return StepReport(kind=c.kind, metrics=metrics, per_module=per_module, curves=state.curves)

    def _tuned_weights(self, model: nn.Module) -> list[TunedWeight]:
        """The selected Linears with current integer codes, one entry per weight Parameter."""
        holders: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and getattr(module, QUANTIZED_ATTR, None) is not None:
                holders.setdefault(id(weight), []).append(module)
        weights: dict[int, TunedWeight] = {}
        for name, module in self.select(model).items():
            stored = current_quantized(module)
            weight = module.weight
            if stored is None or not isinstance(weight, nn.Parameter) or id(weight) in weights:
                continue
            weights[id(weight)] = TunedWeight(
                name=name, modules=tuple(holders[id(weight)]), weight=weight, stored=stored,
                C=stored.codes.clone(), s=nn.Parameter(stored.scale.clone().float()),
                Y=nn.Parameter(stored.dequantize()), C0=stored.codes.clone(),
            )
        return list(weights.values())

    def _unquantized(self, model: nn.Module) -> list[nn.Parameter]:
        """The V step's parameters besides scales; never a weight a format stores."""
        stored = {id(m.weight) for m in model.modules() if FORMATS.current(m) is not None}
        if self.config.unquantized == "none":
            chosen: list[nn.Parameter] = []
        elif self.config.unquantized == "all":
            chosen = list(model.parameters())
        else:
            chosen = [
                p for m in model.modules() for pname, p in m.named_parameters(recurse=False)
                if type(m).__name__.endswith(NORM_TYPES) or pname == "bias"
            ]
        unique = {id(p): p for p in chosen if id(p) not in stored}
        return list(unique.values())
