"""`qmoe`: QMoE's sub-1-bit compression of MoE experts (Frantar & Alistarh 2023).

Layer-wise: per block, each expert's inputs (the tokens the router sends it) give that
expert's Hessians; GPTQ then rounds every expert matrix onto its rows' ternary grids
{min, 0, max} (`math.gptq_ternary`), and the codes of each experts module are
dictionary coded (`coding.py`) into a `TernaryWeight`, saved as the `qmoe` weight format
(`compression/formats/ternary.py`): 1.47 bits per expert weight on disk instead of 32 on
the recipes' tiny Mixtral (69% zeros; the paper's ~90% zeros give ~0.8).

Works on transformers' stacked experts (`gate_up_proj` (E, 2I, H), `down_proj`
(E, H, I), `act_fn`: Mixtral, tested; Qwen2-MoE, Qwen3-MoE and OLMoE have the same
layout in transformers 5, untested) and on plain Linear layers that `targets` names
(experts stored as separate Linears, or any Linear on purpose).

```yaml
- kind: qmoe
  targets: ["*experts*"]  # the experts only, as in the paper; attention and routers stay dense
  damp: 0.1               # fraction of mean diag(H) added to the diagonal (QMoE's 10%)
  act_order: false
```

Per module the report holds `output_rel_error` (mean over the expert matrices that got
tokens, exact from the Hessians), `weight_rel_error`, `zero_fraction`,
`bits_per_parameter` (bytes saved: codewords, offsets, row levels, matrix scales and
the dictionary's costs) and `fewest_tokens` (the least-routed expert's tokens: 0 means
it was rounded to nearest); the stage's metrics add the totals over every module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.moe.qmoe.config import QMoEConfig
from squeezeflow.compression.moe.qmoe.math import gptq_ternary
from squeezeflow.compression.moe.qmoe.runtime import EXPERT_PARAMETERS
from squeezeflow.compression.moe.qmoe.weight import TERNARY_ATTR, WEIGHT, RowLevels, TernaryWeight
from squeezeflow.compression.quantization.gptq.math import Hessian, output_error
from squeezeflow.compression.step import (
    Precision,
    Step,
    StepReport,
    hooks,
    real_tokens,
    summarize,
    token_mask,
)

log = logging.getLogger(__name__)


def is_stacked_experts(module: nn.Module) -> bool:
    """transformers' stacked experts: 3-D `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)
    without biases, and `act_fn` (gate and up halves, act(gate) * up, as Mixtral)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    if any(getattr(module, f"{name}_bias", None) is not None for name in EXPERT_PARAMETERS):
        return False  # gpt-oss style experts (biases, interleaved gate/up) are not this layout
    experts, double_intermediate, hidden = gate_up.shape
    return tuple(down.shape) == (experts, hidden, double_intermediate // 2)


@register_step(QMoEConfig)
class QMoEStep(Step[QMoEConfig]):
    def __init__(self, config: QMoEConfig) -> None:
        super().__init__(config)
        # module name -> parameter name -> one Hessian per matrix (per expert)
        self.hessians: dict[str, dict[str, list[Hessian]]] = {}

    @property
    def calibration_precision(self) -> Precision:
        return self.config.calibration_precision

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_stacked_experts(module)

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        handles = []
        for name, module in modules.items():
            if is_stacked_experts(module):
                experts = int(_parameter(module, "gate_up_proj").shape[0])
                hidden, intermediate = _parameter(module, "down_proj").shape[1:]
                self.hessians[name] = {
                    "gate_up_proj": [Hessian.zeros(hidden) for _ in range(experts)],
                    "down_proj": [Hessian.zeros(intermediate) for _ in range(experts)],
                }
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: self._observe_experts(m, args, self.hessians[name])
                ))
            else:
                self.hessians[name] = {WEIGHT: [Hessian.zeros(_parameter(module, WEIGHT).shape[1])]}
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: self.hessians[name][WEIGHT][0].add_batch(
                        real_tokens(args[0].detach()))
                ))
        with hooks(handles):
            yield

    @staticmethod
    def _observe_experts(module: nn.Module, args: tuple[Any, ...], hessians: dict[str, list[Hessian]]) -> None:
        """Each expert's inputs: the tokens routed to it, and what its down_proj sees of them."""
        hidden, top_k_index = args[0].detach(), args[1]  # (tokens, H), (tokens, k)
        mask = token_mask()
        real = (mask.reshape(-1) if mask is not None and mask.numel() == hidden.shape[0]
                else torch.ones(hidden.shape[0], dtype=torch.bool))  # padding left out
        gate_up = _parameter(module, "gate_up_proj")  # (E, 2I, H)
        act: Any = module.act_fn
        for expert in range(gate_up.shape[0]):
            routed = (top_k_index == expert).any(dim=-1) & real  # (tokens,)
            if not bool(routed.any()):
                continue
            X = hidden[routed].to(torch.float32)  # (routed, H)
            hessians["gate_up_proj"][expert].add_batch(X)
            gate, up = (X @ gate_up[expert].T.to(torch.float32)).chunk(2, dim=-1)  # (routed, I)
            hessians["down_proj"][expert].add_batch(act(gate) * up)

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        per_module = {}
        for name, module in modules.items():
            hessians = self.hessians.pop(name)
            codes, levels = {}, {}
            output_errors, fewest, squared_error, squared_norm = [], None, 0.0, 0.0
            for parameter_name, per_matrix in hessians.items():
                parameter = _parameter(module, parameter_name)
                W = parameter.detach().to(torch.float32).reshape(-1, *parameter.shape[-2:])  # (E, out, in)
                matrix_codes, matrix_levels, W_hat = [], [], torch.empty_like(W)
                for index, hessian in enumerate(per_matrix):
                    result = gptq_ternary(W[index], hessian.H, damp=self.config.damp,
                                          block_size=self.config.block_size,
                                          act_order=self.config.act_order)
                    matrix_codes.append(result.codes)
                    matrix_levels.append(result.levels)
                    W_hat[index] = result.dequantize()
                    if hessian.count:
                        output_errors.append(output_error(W[index], W_hat[index], hessian.H))
                    fewest = hessian.count if fewest is None else min(fewest, hessian.count)
                squared_error += float((W - W_hat).square().sum())
                squared_norm += float(W.square().sum())
                with torch.no_grad():
                    parameter.copy_(W_hat.reshape(parameter.shape).to(parameter.dtype))
                codes[parameter_name] = torch.stack(matrix_codes).reshape(parameter.shape)
                levels[parameter_name] = RowLevels(
                    codes=torch.stack([lv.codes for lv in matrix_levels]).reshape(*parameter.shape[:-1], 2),
                    scale=torch.stack([lv.scale for lv in matrix_levels]).reshape(parameter.shape[:-2]),
                )
            stored = TernaryWeight.from_codes(codes, levels)
            setattr(module, TERNARY_ATTR, stored)
            zeros = sum(int((c == 0).sum()) for c in codes.values())
            per_module[name] = {
                "output_rel_error": sum(output_errors) / max(1, len(output_errors)),
                "weight_rel_error": (squared_error / max(squared_norm, 1e-30)) ** 0.5,
                "zero_fraction": zeros / stored.parameters,
                "bits_per_parameter": 8.0 * stored.stored_bytes() / stored.parameters,
                "fewest_tokens": float(fewest or 0),
                "parameters": float(stored.parameters),
                "stored_bytes": float(stored.stored_bytes()),
                "zeros": float(zeros),
            }
            log.debug("qmoe %s: %.3f bits/parameter, %.1f%% zeros", name,
                      per_module[name]["bits_per_parameter"], 100 * per_module[name]["zero_fraction"])
        return StepReport(kind=self.config.kind, per_module=per_module)

    def finalize(self, model: nn.Module, reports: list[StepReport]) -> StepReport:
        """Per-module means, plus the totals: bits per parameter and zeros over every module."""
        merged = super().finalize(model, reports)
        parameters = sum(m["parameters"] for m in merged.per_module.values())
        if not parameters:
            log.warning("qmoe: no module matched targets %s", list(self.config.targets))
            return merged
        totals = {
            "parameters": parameters,
            "bits_per_parameter": 8.0 * sum(m["stored_bytes"] for m in merged.per_module.values()) / parameters,
            "zero_fraction": sum(m["zeros"] for m in merged.per_module.values()) / parameters,
        }
        return merged.model_copy(update={"metrics": {**summarize(merged.per_module), **totals}})


def _parameter(module: nn.Module, name: str) -> Tensor:
    parameter = getattr(module, name)
    assert isinstance(parameter, Tensor)
    return parameter
