"""The `pv_tune` step's config: its fields, checked before any weights load (no torch).

The algorithm and its YAML example are in `step.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from squeezeflow.compression.config import Needs, StepConfig


class PVTuneConfig(StepConfig):
    kind: Literal["pv_tune"] = "pv_tune"
    needs: ClassVar[Needs] = Needs.TEACHER
    teacher: str = "base"  # "base", models:/NAME/VERSION (or @alias), or a model folder
    # Fraction of each weight's codes a P step may re-round; 1.0 = straight-through
    # estimation. On the 2-bit test LM (200 steps, p_lr 1e-2) tau 0.0033 / 0.01 / 0.03 / 1
    # gave perplexity 2.852 / 2.778 / 2.787 / 2.789 from RTN, 2.802 / 2.783 / 2.782 / 2.791
    # from GPTQ (benchmarks/README.md, PV-Tuning).
    tau: float = Field(0.01, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)  # the paper distills the plain (T = 1) distributions
    max_steps: int = Field(200, ge=1)  # a few hundred steps: codes move a fraction tau per step
    max_tokens: int | None = Field(None, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    v_lr: float = Field(1e-4, gt=0)  # V step (scales, unquantized parameters): fine-tuning rate
    # P step: Adam moves a buffer about p_lr per step, and a code flips once its buffer is
    # half a grid step away. About a tenth of the grid step: on the 2-bit test LM (grid
    # steps ~0.1) 1e-2 was PV's best of 3e-3, 1e-2, 3e-2; finer grids want smaller rates.
    p_lr: float = Field(1e-2, gt=0)
    scales: bool = True  # the V step trains the grid scales
    codes: bool = True  # false: V steps only, every code kept (the paper's "continuous only")
    unquantized: Literal["all", "norms_biases", "none"] = "all"  # what else the V step trains
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(10, ge=0)  # lets Adam's moment estimates settle
    weight_decay: float = Field(0.0, ge=0)  # would pull buffers and scales toward 0
    grad_clip: float | None = Field(1.0, gt=0)  # caps the first steps' large gradients
    keep_sparsity: bool = True  # pruned (zero) weights of unquantized Linears stay zero
    eval_every: int = Field(0, ge=0)  # steps between validations; 0: no validation
    validation_batches: int = Field(1, ge=1)  # held out from training when eval_every > 0
    patience: int = Field(0, ge=0)  # validations without improvement before stopping; 0: never
    min_delta: float = Field(0.0, ge=0)  # an improvement smaller than this does not count
    checkpoint_every: int = Field(50, ge=1)  # steps between resumable checkpoints
    log_every: int = Field(10, ge=1)  # steps per point of the training curves

    @model_validator(mode="after")
    def _consistent(self) -> PVTuneConfig:
        if self.patience and not self.eval_every:
            raise ValueError("patience: early stopping needs eval_every > 0")
        return self

    def check_model(self, config: Any) -> Any:
        from squeezeflow.compression.families import detect_family  # light: no torch

        if not detect_family(config).next_token_logits:
            raise ValueError("kind: pv_tune distills next-token distributions; it needs a causal LM")
        return config
