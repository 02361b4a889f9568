"""`bitstack`: decompose each Linear into a stack of ~1-bit residual blocks, ranked across
the model by importance, so that one artifact loads at any memory budget (BitStack, Wang
et al. 2024).

```yaml
- kind: bitstack
  niter: 16              # residual blocks per Linear (the paper's 16)
  factor_bits: 0.125     # per block, fp16 factors worth this many bits per weight
  importance: perplexity # the paper's score; fisher | output_error: cheaper proxies
- kind: bitstack
  niter: 8
  rank: 1                # a fixed rank k for every Linear instead of factor_bits
  activation_aware: false
  importance: output_error
```

One calibration pass gives each Linear's input RMS per channel (the activation-aware
scales s, `math.activation_scale`) and keeps `importance_samples` calibration
sequences. Then every Linear is decomposed (`math.decompose`): block i = (sign bits,
U_i, V_i) costs 1 + 16 k (out + in) / (out * in) bits per weight. With `rank: null` k
follows `factor_bits` per shape (0.125: k = 16 on a 4096 x 4096 layer as in the paper;
k = 1, 0.375 bits, on a 64 x 128 one, where k = 16 would cost 6 bits a block).

Importance orders every block of every Linear; a memory budget loads a prefix of it.
Every Linear's first block comes first (without one a Linear has no weight), then:
- `perplexity`, the paper's score (Sec. 2.2): level by level, so that Linears differ by
  at most one block at any size; for level b = 2..niter, with every Linear at b - 1
  blocks, the calibration perplexity when one Linear alone gets block b, lowest first.
  (niter - 1) x Linears forward passes over the kept sequences.
- `fisher`: a second-order estimate of the same loss change, ranked freely: block b of a
  Linear gains 1/2 sum F * (E_{b-1}^2 - E_b^2), with E_b = W - W_hat_b and F the
  diagonal empirical Fisher (squared per-sequence gradients of the calibration loss at
  the original weights: one backward pass per kept sequence); blocks are taken in
  decreasing gain per byte, each Linear's in stack order.
- `output_error`: the same with F replaced by the input's mean square per channel, the
  diagonal estimate of each Linear's output error; free (no extra passes), for models
  without a language-model loss.
With `perplexity`, the report's `importance_spearman_output_error` is the rank
correlation of the output-error gains with the perplexity scores, level by level.
`perplexity` and `fisher` need a causal LM and the whole model in one calibration
pass: keep them out of stages with layer-wise steps (gptq, sparsegpt).

Per module the report holds `weight_rel_error` and `scaled_rel_error` (relative error
in the scaled space, the output-error estimate) with every block, `rank` and
`bits_per_weight` of the full stack.
"""

from __future__ import annotations

import heapq
import logging
import math as pymath
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.catalog import register_step
from squeezeflow.compression.quantization.bitstack.config import BitStackConfig
from squeezeflow.compression.quantization.bitstack.math import (
    FACTOR_BYTES,
    activation_scale,
    block,
    decompose,
    rank_for_factor_bits,
)
from squeezeflow.compression.quantization.bitstack.stored import BITSTACK_ATTR, BitStackWeight
from squeezeflow.compression.quantization.qweight import attach, relative_error
from squeezeflow.compression.step import Step, StepReport, hooks, real_tokens, summarize

log = logging.getLogger(__name__)

Ranking = list[tuple[str, int]]  # (Linear, block index), most important first


@register_step(BitStackConfig)
class BitStackStep(Step[BitStackConfig]):
    def __init__(self, config: BitStackConfig) -> None:
        super().__init__(config)
        self._root: nn.Module | None = None  # the model, when selected from its root
        self.sum_squares: dict[str, Tensor] = {}  # Linear -> (in,) sum over tokens of x^2
        self.tokens: dict[str, int] = {}
        self.sequences: list[dict[str, Tensor]] = []  # kept calibration batches
        self.decomposed: dict[str, nn.Module] = {}  # every Linear this step decomposed
        self.gains: dict[str, Tensor] = {}  # Linear -> (niter,) proxy loss gain of each block
        self.importance_seconds = 0.0  # spent on the Fisher pass (apply) and ranking (finalize)

    def select(self, root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        # from the model's root (basic runner) its calibration inputs can be kept for the
        # perplexity and fisher scores; a layer-wise runner selects from one block at a time
        self._root = root if prefix == "" else None
        return super().select(root, prefix)

    @contextmanager
    def observe(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Sum x^2 per input channel of each Linear; keep the model's calibration inputs."""
        last: dict[str, Any] = {}  # q/k/v (and gate/up) share one input: square it once

        def accumulate(args: tuple[Tensor, ...], name: str) -> None:
            X = args[0]
            if last.get("input") is not X:
                X2 = real_tokens(X.detach()).to(torch.float32)  # (tokens, in), no padding
                last.update(input=X, squares=X2.pow(2).sum(dim=0), tokens=int(X2.shape[0]))
            previous = self.sum_squares.get(name)
            squares: Tensor = last["squares"]
            self.sum_squares[name] = squares if previous is None else previous + squares
            self.tokens[name] = self.tokens.get(name, 0) + last["tokens"]

        handles = [
            module.register_forward_pre_hook(lambda m, args, name=name: accumulate(args, name))
            for name, module in modules.items()
        ]
        if self._root is not None:
            handles.append(self._root.register_forward_pre_hook(self._keep_sequences, with_kwargs=True))
        try:
            with hooks(handles):
                yield
        finally:
            last.clear()

    def _keep_sequences(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, Tensor):
            return
        kept = sum(int(batch["input_ids"].shape[0]) for batch in self.sequences)
        room = self.config.importance_samples - kept
        if room <= 0:
            return
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, Tensor):
            mask = torch.ones_like(input_ids)
        self.sequences.append({"input_ids": input_ids[:room].clone(), "attention_mask": mask[:room].clone()})

    def apply(self, modules: dict[str, nn.Module]) -> StepReport:
        missing = [name for name in modules if name not in self.sum_squares]
        if missing:
            raise ValueError(f"bitstack: {missing[0]} saw no calibration inputs (is it used in forward?)")
        # Fisher at the original weights: before any Linear is decomposed
        start = time.perf_counter()
        fisher = self._fisher(modules) if self.config.importance == "fisher" else {}
        self.importance_seconds += time.perf_counter() - start
        per_module = {}
        for name, module in modules.items():
            W = _weight(module).detach().to(torch.float32, copy=True)  # (out, in)
            out_features, in_features = W.shape
            mean_square = self.sum_squares.pop(name) / max(self.tokens.pop(name), 1)  # (in,) E[x_j^2]
            s = (activation_scale(mean_square) if self.config.activation_aware
                 else torch.ones(in_features))  # (in,)
            k = self.config.rank or rank_for_factor_bits(out_features, in_features, self.config.factor_bits)
            parts = decompose(W * s[None, :], self.config.niter, k)
            stored = BitStackWeight(
                signs=parts.signs, U=parts.U, V=parts.V, scale=s,
                order=torch.arange(self.config.niter), niter=self.config.niter,
            )
            W_hat = attach(module, stored, BITSTACK_ATTR).to(torch.float32)
            # proxy loss weights per weight: Fisher, or E[x_j^2] (output error estimate)
            F = fisher.pop(name) if fisher else mean_square[None, :].expand(out_features, -1)
            self.gains[name] = block_gains(W, stored, F)
            self.decomposed[name] = module
            per_module[name] = {
                "weight_rel_error": relative_error(W, W_hat),
                "scaled_rel_error": float(parts.residual_norms[-1] / parts.residual_norms[0].clamp(min=1e-300)),
                "rank": float(stored.rank),
                "bits_per_weight": 8 * (stored.blocks * stored.block_bytes + FACTOR_BYTES * in_features)
                / (out_features * in_features),
            }
        # a provisional order among these Linears, so that the result is complete even
        # without `finalize` (which ranks across every Linear of the model)
        self._set_order(greedy_ranking(
            {name: self.gains[name] for name in modules}, self._bytes(list(modules))
        ))
        return StepReport(kind=self.config.kind, per_module=per_module)

    def finalize(self, model: nn.Module, reports: list[StepReport]) -> StepReport:
        merged = reports[0]
        for report in reports[1:]:
            merged = merged.merge(report)
        metrics = summarize(merged.per_module)
        start = time.perf_counter()
        if self.config.importance == "perplexity":
            nll = self._perplexity_scores()  # Linear -> (niter - 1,) NLL with its next block
            ranking = level_ranking({name: -values for name, values in nll.items()})
            metrics["importance_spearman_output_error"] = level_spearman(
                {name: gains[1:] for name, gains in self.gains.items()},
                {name: -values for name, values in nll.items()},
            )
        else:
            ranking = greedy_ranking(self.gains, self._bytes(list(self.decomposed)))
        self._set_order(ranking)
        metrics["importance_seconds"] = self.importance_seconds + time.perf_counter() - start
        self.importance_seconds = 0.0
        stacks = [getattr(m, BITSTACK_ATTR) for m in self.decomposed.values()]
        weights = sum(s.shape[0] * s.shape[1] for s in stacks)
        metrics["blocks"] = float(sum(s.blocks for s in stacks))
        metrics["bits_per_weight_full"] = 8 * sum(s.blocks * s.block_bytes for s in stacks) / weights
        metrics["bits_per_weight_one_block"] = 8 * sum(s.block_bytes for s in stacks) / weights
        self.sequences, self.gains, self.decomposed = [], {}, {}
        return merged.model_copy(update={"metrics": metrics})

    def _bytes(self, names: list[str]) -> dict[str, int]:
        return {name: getattr(self.decomposed[name], BITSTACK_ATTR).block_bytes for name in names}

    def _set_order(self, ranking: Ranking) -> None:
        """Give every decomposed Linear the positions of its blocks in `ranking`."""
        positions: dict[str, list[int]] = {name: [] for name, _ in ranking}
        for position, (name, _) in enumerate(ranking):
            positions[name].append(position)
        for name, module_positions in positions.items():
            module = self.decomposed[name]
            stored: BitStackWeight = getattr(module, BITSTACK_ATTR)
            setattr(module, BITSTACK_ATTR,
                    replace(stored, order=torch.tensor(module_positions, dtype=torch.int64)))

    def _model(self, what: str) -> nn.Module:
        if self._root is None or not self.sequences:
            raise ValueError(
                f"bitstack importance {what!r} runs the whole model on calibration sequences: "
                "put bitstack in a stage without layer-wise steps, or use importance: output_error"
            )
        return self._root

    def _fisher(self, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of each Linear's weight: the mean over kept sequences
        of the squared gradient of the sequence's next-token loss, (out, in) each."""
        model = self._model("fisher")
        weights = [_weight(module) for module in modules.values()]
        fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        trainable = {p: p.requires_grad for p in model.parameters()}
        count = 0
        try:
            for parameter in model.parameters():
                parameter.requires_grad_(False)  # only the decomposed weights need gradients
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad():
                for batch in self.sequences:
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                        ids = ids[mask.bool()][None, :]  # (1, tokens): one sequence, no padding
                        if ids.shape[1] < 2:
                            continue
                        loss = _nll(model, ids, torch.ones_like(ids))[0] / (ids.shape[1] - 1)
                        for total, grad in zip(fisher, torch.autograd.grad(loss, weights), strict=True):
                            total += grad.detach().to(torch.float32).pow(2)
                        count += 1
        finally:
            for parameter, flag in trainable.items():
                parameter.requires_grad_(flag)
        if count == 0:
            raise ValueError("bitstack importance 'fisher' needs calibration sequences of 2 tokens or more")
        return {name: total / count for name, total in zip(modules, fisher, strict=True)}

    def _perplexity_scores(self) -> dict[str, Tensor]:
        """The paper's score: NLL[name][b - 1] with every Linear at b blocks, `name` at b + 1.

        Weights move block by block in place (each Linear's weight holds its first b
        blocks) and are set back to the full stack, exactly, at the end.
        """
        model = self._model("perplexity")
        modules = self.decomposed
        stacks: dict[str, BitStackWeight] = {n: getattr(m, BITSTACK_ATTR) for n, m in modules.items()}
        niter = self.config.niter
        scores = {name: torch.zeros(max(niter - 1, 0), dtype=torch.float64) for name in modules}
        with torch.no_grad():
            weights = {name: _weight(module) for name, module in modules.items()}
            for name, weight in weights.items():
                weight.copy_(_block_weight(stacks[name], 0))  # level 1: one block each
            for level in range(1, niter):
                for name, weight in weights.items():
                    saved = weight.detach().clone()
                    weight.add_(_block_weight(stacks[name], level))
                    scores[name][level - 1] = _mean_nll(model, self.sequences)
                    weight.copy_(saved)
                for name, weight in weights.items():
                    weight.add_(_block_weight(stacks[name], level))
                log.info("bitstack: level %d of %d ranked", level + 1, niter)
            for name, module in modules.items():
                attach(module, stacks[name], BITSTACK_ATTR)  # the full stack, bit-exact
        return scores


def block_gains(W: Tensor, stored: BitStackWeight, F: Tensor) -> Tensor:
    """(blocks,) proxy loss decrease of each block: 1/2 sum F * (E_{b-1}^2 - E_b^2).

    W: (out, in) the original weight; F: (out, in) per-weight loss curvature (diagonal
    Fisher, or E[x_j^2] for the output error); E_b = W - (first b blocks), E_0 = W.
    """
    loaded = torch.zeros_like(W)  # (out, in)
    before = float((F * W.pow(2)).sum()) / 2
    gains = []
    for i in range(stored.blocks):
        loaded += _block_weight(stored, i)
        after = float((F * (W - loaded).pow(2)).sum()) / 2
        gains.append(before - after)
        before = after
    return torch.tensor(gains, dtype=torch.float64)


def greedy_ranking(gains: dict[str, Tensor], block_bytes: dict[str, int]) -> Ranking:
    """Every Linear's first block, then repeatedly the next block (in stack order) of the
    Linear whose next block gains the most per byte."""
    ranking: Ranking = [(name, 0) for name in gains]
    heap = [(-float(g[1]) / block_bytes[name], i, name, 1) for i, (name, g) in enumerate(gains.items())
            if g.numel() > 1]
    heapq.heapify(heap)
    while heap:
        _, i, name, index = heapq.heappop(heap)
        ranking.append((name, index))
        if index + 1 < gains[name].numel():
            heapq.heappush(heap, (-float(gains[name][index + 1]) / block_bytes[name], i, name, index + 1))
    return ranking


def level_ranking(scores: dict[str, Tensor]) -> Ranking:
    """Every Linear's first block, then level by level (block b of every Linear before any
    block b + 1), each level by decreasing `scores[name][b - 1]`."""
    names = list(scores)
    ranking: Ranking = [(name, 0) for name in names]
    levels = max((int(values.numel()) for values in scores.values()), default=0)
    for level in range(levels):
        ordered = sorted(range(len(names)), key=lambda i: (-float(scores[names[i]][level]), i))
        ranking += [(names[i], level + 1) for i in ordered]
    return ranking


def level_spearman(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Mean over levels of the Spearman correlation between two scores of the Linears."""
    rho = []
    levels = min(min(int(v.numel()) for v in a.values()), min(int(v.numel()) for v in b.values()))
    names = list(a)
    n = len(names)
    for level in range(levels):
        rank_a = _ranks([float(a[name][level]) for name in names])
        rank_b = _ranks([float(b[name][level]) for name in names])
        if n >= 2:
            d2 = sum((x - y) ** 2 for x, y in zip(rank_a, rank_b, strict=True))
            rho.append(1 - 6 * d2 / (n * (n * n - 1)))
    return sum(rho) / len(rho) if rho else pymath.nan


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def _weight(module: nn.Module) -> Tensor:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight


def _block_weight(stored: BitStackWeight, index: int) -> Tensor:
    """Block `index` mapped back to the weight's space: B_i diag(s)^-1, (out, in)."""
    return block(stored.signs[index], stored.U[index], stored.V[index], stored.shape) / stored.scale[None, :]


def _nll(model: nn.Module, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Summed next-token negative log-likelihood over unpadded tokens, and their count."""
    output = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ValueError("bitstack importance 'perplexity' and 'fisher' need a causal LM; "
                         "use importance: output_error")
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (batch, seq - 1)
    total = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
        ignore_index=-100, reduction="sum",
    )
    return total, int((labels != -100).sum())


def _mean_nll(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Mean next-token negative log-likelihood over the unpadded tokens of `batches`."""
    total, count = 0.0, 0
    for batch in batches:
        loss, tokens = _nll(model, batch["input_ids"], batch["attention_mask"])
        total, count = total + float(loss), count + tokens
    return total / max(count, 1)
