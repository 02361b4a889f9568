"""`smoothquant`: migrate activation outliers into the weights before W8A8 (SmoothQuant,
Xiao et al. 2022), with per-channel scales from calibration statistics.

```yaml
- kind: smoothquant
  alpha: 0.5         # migration strength in [0, 1]: 0 leaves activations, 1 moves all into weights
  fold: true         # fold into preceding norms where that is exact
```

Follow it with `- kind: w8a8` in the same stage (int8 weights x int8 activations).

Where the input of a group of Linears is the output of a norm (LayerNorm, RMSNorm)
that feeds nothing else (pre-norm blocks: Llama, OPT, Qwen2), the scales are folded:
the norm's weight and bias are divided by s and the Linears' columns multiplied by s,
so the model stays a plain transformers model. Elsewhere (post-norm BERT blocks,
whose norm output is also the residual; inputs made by attention or an activation)
the factor is attached to the Linear and the `w8a8` step that follows in the same
stage quantizes W * s and divides the input by s inside its fused activation
quantization. A weight-only quantizer (`rtn`, `gptq`) ignores unfolded factors; for
`gptq` put `smoothquant` in an earlier stage of its own, since gptq observes its
inputs in the same calibration pass (before the fold) and its observers would count
as other readers of the norm output, which stops folding.
Which producer feeds which consumer is observed, not assumed: during calibration a
torch-function mode records every op that reads a norm's output.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.smoothquant.config import SmoothQuantConfig
from squeezeflow.compression.quantization.smoothquant.math import outlier_ratio, smoothing_scales
from squeezeflow.compression.step import Step, StepReport, hooks, real_tokens

log = logging.getLogger(__name__)

SMOOTHING_ATTR = "squeezeflow_smoothing"  # (in,) factor for a Linear whose scale is not folded
NORM_SAMPLE_ROWS = 4  # input rows kept per norm to check numerically that folding is exact
LINEAR_FUNCTIONS = (torch.nn.functional.linear, torch._C._nn.linear)


class _NormReaders(TorchFunctionMode):
    """Records which functions read the latest output of each norm."""

    def __init__(self, norm_outputs: dict[str, Tensor], linear_names: dict[int, str],
                 readers: dict[str, set[str]]) -> None:
        super().__init__()
        self.norm_outputs = norm_outputs  # norm name -> its latest output
        self.linear_names = linear_names  # id(weight Parameter) -> Linear name
        self.readers = readers  # norm name -> Linear names, or "op:<name>" for other readers
        self.paused = False  # set while the step's own hooks read tensors

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.paused:
            return result
        if isinstance(result, torch.Size) or not isinstance(result, Tensor | tuple | list):
            return result  # metadata reads (shape, dtype, size) do not consume values
        arguments = [*args, *kwargs.values()]
        flat = [a for arg in arguments for a in (arg if isinstance(arg, list | tuple) else [arg])]
        for norm, output in self.norm_outputs.items():
            if not any(a is output for a in flat):
                continue
            if func in LINEAR_FUNCTIONS and len(args) > 1 and id(args[1]) in self.linear_names:
                self.readers[norm].add(self.linear_names[id(args[1])])
            else:
                self.readers[norm].add(f"op:{getattr(func, '__name__', func)}")
        return result


@register_step(SmoothQuantConfig)
class SmoothQuantStep(Step[SmoothQuantConfig]):
    def __init__(self, config: SmoothQuantConfig) -> None:
        super().__init__(config)
        self._scope: nn.Module | None = None
        self._prefix = ""
        self._readers_mode: _NormReaders | None = None
        self.act_amax: dict[str, Tensor] = {}  # Linear name -> (in,) max |x| per input channel
        self.producer: dict[str, str | None] = {}  # Linear name -> norm whose output it reads
        self.readers: dict[str, set[str]] = defaultdict(set)
        self.norms: dict[str, nn.Module] = {}
        self.norm_samples: dict[str, Tensor] = {}

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        # the norms that scales may fold into live under the same root as the Linears
        self._scope, self._prefix = root, prefix
        return super().select(root, prefix)

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        norm_outputs: dict[str, Tensor] = {}
        handles = []
        if self.config.fold and self._scope is not None:
            for name, module in self._scope.named_modules():
                if _is_norm(module):
                    full = f"{self._prefix}.{name}" if self._prefix and name else (self._prefix or name)
                    self.norms[full] = module
                    handles.append(module.register_forward_hook(self._norm_hook(full, norm_outputs)))
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(self._linear_hook(name, norm_outputs)))
        linear_names = {id(m.weight): n for n, m in modules.items()}
        self._readers_mode = _NormReaders(norm_outputs, linear_names, self.readers)
        with hooks(handles), self._readers_mode:
            yield
        norm_outputs.clear()
        self._readers_mode = None

    def _norm_hook(self, name: str, outputs: dict[str, Tensor]) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            outputs[name] = output
            with self._own_reads():
                self._sample(name, args)

        return hook

    def _sample(self, name: str, args: tuple[Any, ...]) -> None:
        """Keep a few input rows of each norm, to check that a fold is exact."""
        if name not in self.norm_samples and isinstance(args[0], Tensor):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, hidden)
            self.norm_samples[name] = rows[:NORM_SAMPLE_ROWS].clone()

    def _linear_hook(self, name: str, norm_outputs: dict[str, Tensor]) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            with self._own_reads():
                x = args[0].detach()
                amax = real_tokens(x).abs().amax(dim=0).to(torch.float32)  # (in,), no padding
                previous = self.act_amax.get(name)
                self.act_amax[name] = amax if previous is None else torch.maximum(previous, amax)
            producer = next((n for n, out in norm_outputs.items() if out is args[0]), None)
            if name in self.producer and self.producer[name] != producer:
                producer = None  # inconsistent across calls: never fold
            self.producer[name] = producer

        return hook

    @contextmanager
    def _own_reads(self) -> Iterator[None]:
        """Reads by this step's hooks are not readers of a norm's output."""
        mode = self._readers_mode
        if mode is not None:
            mode.paused = True
        try:
            yield
        finally:
            if mode is not None:
                mode.paused = False

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        missing = [name for name in modules if name not in self.act_amax]
        if missing:
            raise RuntimeError(f"smoothquant saw no calibration inputs for {', '.join(missing[:3])}")
        per_module: dict[str, dict[str, float]] = {}
        groups: dict[str, list[str]] = defaultdict(list)
        for name in modules:
            producer = self.producer.get(name)
            if producer is not None and self.readers[producer] <= set(modules):
                groups[producer].append(name)
        folded: set[str] = set()
        for norm_name, names in groups.items():
            if set(names) != self.readers[norm_name]:
                continue
            weights = [_weight(modules[n]) for n in names]
            act = torch.stack([self.act_amax[n] for n in names]).amax(dim=0)  # (in,)
            s = smoothing_scales(act, weights, self.config.alpha)  # (in,)
            if not self._fold_into_norm(norm_name, s):
                continue
            for n in names:
                weight = modules[n].weight
                assert isinstance(weight, Tensor)
                with torch.no_grad():
                    weight.mul_(s)  # W: (out, in) * s over columns
                per_module[n] = _metrics(act, s, folded=True)
                folded.add(n)
        for name, module in modules.items():
            if name in folded:
                continue
            s = smoothing_scales(self.act_amax[name], [_weight(module)], self.config.alpha)
            setattr(module, SMOOTHING_ATTR, s)
            per_module[name] = _metrics(self.act_amax[name], s, folded=False)
        log.info("smoothquant: %d Linears folded into norms, %d keep a runtime factor",
                 len(folded), len(modules) - len(folded))
        self.act_amax, self.producer, self.norm_samples = {}, {}, {}
        self.readers = defaultdict(set)
        return StepReport(kind=self.config.kind, per_module=per_module)

    def _fold_into_norm(self, norm_name: str, s: Tensor) -> bool:
        """Divide the norm's affine parameters by s if that scales its output by 1/s."""
        norm, sample = self.norms[norm_name], self.norm_samples.get(norm_name)
        if sample is None:
            return False
        with torch.no_grad():
            expected = norm(sample) / s  # (rows, in)
            originals = {k: p.detach().clone() for k, p in norm.named_parameters(recurse=False)}
            for parameter in norm.parameters(recurse=False):
                parameter.div_(s)
            if torch.allclose(norm(sample), expected, rtol=1e-4, atol=1e-6):
                return True
            for key, value in originals.items():  # e.g. a (1 + weight) norm: not foldable
                getattr(norm, key).copy_(value)
        log.info("smoothquant: %s does not scale linearly with its weight; not folded", norm_name)
        return False


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm or an RMSNorm-like module: a 1-D affine weight over the last dimension."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter) and weight.dim() == 1
        and "norm" in type(module).__name__.lower()
    )


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.detach().to(torch.float32)  # (out, in)


def _metrics(act_amax: Tensor, s: Tensor, folded: bool) -> dict[str, float]:
    return {
        "folded": float(folded),
        "activation_outlier_ratio": outlier_ratio(act_amax),
        "smoothed_outlier_ratio": outlier_ratio(act_amax / s),
        "max_scale": float(s.max()),
    }
