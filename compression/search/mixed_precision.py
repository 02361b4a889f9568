"""Per-layer mixed precision: one weight format per Linear (fused groups decided together)
under an effective-bits or size budget, with the least total measured sensitivity.

1. Sensitivity s[g, f] of fused group g (q/k/v of one attention, gate/up of one MLP:
   layers fed the very same input tensor, which kernels and exporters concatenate) to
   candidate format f, measured on calibration batches with only g quantized to f:
   - `kl` (default): s = mean over real tokens t of KL(p_t || p^_t), p = softmax of the
     base model's logits, p^ = with g quantized. This is the quantity perplexity feels
     (ppl = exp of mean cross entropy; CE(q) - CE(p) = KL on the model's own
     distribution). Cost: groups x candidates forward passes over the calibration set,
     and the base log-probabilities of the calibration tokens kept in memory.
   - `hessian` (cheap proxy, one forward pass): s = sum over layers l in g of
     tr(dW_l Sigma dW_l^T), dW = W - Q(W), Sigma = E_x[x x^T] (in, in): the expected
     squared output error of each layer per token (the GPTQ / HAWQ objective). It does
     not see how an error propagates to the logits, so it ranks layers less well.
2. Choice: a multiple-choice knapsack, exactly solved by dynamic programming over the
   budget in bytes: minimize sum_g s[g, f_g] subject to sum_g bytes[g, f_g] <= B.
   bytes counts what the integer format stores (`compression/formats/integer.py`):
   packed codes ceil(out*in*bits/8) + fp16 scales 2*out*groups + packed zero points
   ceil(out*groups*bits/8) per layer.
3. The plan becomes an ordinary recipe: one stage, one quantization step per format
   used, each with `targets:` naming its layers (`plan_to_recipe`, `write_recipe`).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from squeezeflow.compression.config import DEFAULT_IGNORE
from squeezeflow.compression.quantization.fields import SUPPORTED_BITS
from squeezeflow.compression.search.spec import SCALE_BITS
from squeezeflow.compression.step import calibration_tokens, real_tokens

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]
Method = Literal["rtn", "gptq"]
Measure = Literal["kl", "hessian"]
MAX_STATES = 200_000  # DP budget cells; above it bytes are grouped into coarser units


@dataclass(frozen=True)
class Candidate:
    """One integer weight format a layer may get."""

    method: Method = "rtn"
    bits: int = 4
    group_size: int | None = 128  # None = one grid per output row
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} (got {self.bits})")

    @property
    def label(self) -> str:
        return f"{self.method} w{self.bits} g{self.group_size or 'row'}"

    def stored_bytes(self, rows: int, columns: int) -> int:
        """Bytes the integer format stores for a (rows, columns) weight in this format."""
        size = columns if self.group_size is None else min(self.group_size, columns)
        groups = -(-columns // size)
        codes = -(-rows * columns * self.bits // 8)
        scales = rows * groups * SCALE_BITS // 8
        zeros = -(-rows * groups * self.bits // 8)
        return codes + scales + zeros

    def step(self, targets: Sequence[str], template: dict[str, Any] | None = None) -> dict[str, Any]:
        """This format's step for `targets`; other fields (damp, act_order, ...) from `template`."""
        return {**(template or {}), "kind": self.method, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "targets": list(targets)}

    def quantize(self, W: Tensor, Sigma: Tensor | None) -> Tensor:
        """The dequantized weight W^ (out, in) this format gives W (out, in)."""
        if self.method == "rtn":
            from squeezeflow.compression.quantization.rtn.math import quantize_rtn

            return quantize_rtn(W, self.bits, self.group_size, self.symmetric).dequantize()
        from squeezeflow.compression.quantization.gptq.math import gptq_quantize

        if Sigma is None:
            raise ValueError("gptq candidates need the layer's input second moment")
        return gptq_quantize(W, Sigma, self.bits, self.group_size, self.symmetric).quantized.dequantize()


@dataclass(frozen=True)
class LayerGroup:
    """Linear layers fed the same input: they get one format together."""

    layers: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (out, in) of each layer

    @property
    def name(self) -> str:
        if len(self.layers) == 1:
            return self.layers[0]
        parent = self.layers[0].rsplit(".", 1)[0]
        return f"{parent}.{{{','.join(n.rsplit('.', 1)[-1] for n in self.layers)}}}"

    @property
    def weights(self) -> int:
        return sum(rows * columns for rows, columns in self.shapes)

    def stored_bytes(self, candidate: Candidate) -> int:
        return sum(candidate.stored_bytes(rows, columns) for rows, columns in self.shapes)


@dataclass(frozen=True)
class SensitivityTable:
    groups: tuple[LayerGroup, ...]
    candidates: tuple[Candidate, ...]
    sensitivity: Tensor  # (groups, candidates) float64
    measure: Measure

    @property
    def weights(self) -> int:
        return sum(group.weights for group in self.groups)

    def bytes_of(self, choice: Sequence[int]) -> int:
        return sum(g.stored_bytes(self.candidates[c]) for g, c in zip(self.groups, choice, strict=True))

    def to_json(self) -> dict[str, Any]:
        """Plain data (measuring is the costly part of planning: a cache keeps this)."""
        return {"measure": self.measure, "sensitivity": self.sensitivity.tolist(),
                "groups": [{"layers": list(g.layers), "shapes": [list(s) for s in g.shapes]} for g in self.groups],
                "candidates": [asdict(c) for c in self.candidates]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensitivityTable:
        groups = tuple(LayerGroup(tuple(g["layers"]), tuple((int(r), int(c)) for r, c in g["shapes"]))
                       for g in data["groups"])
        return cls(groups, tuple(Candidate(**c) for c in data["candidates"]),
                   torch.tensor(data["sensitivity"], dtype=torch.float64), data["measure"])


@dataclass(frozen=True)
class Plan:
    """One candidate per fused group, and what it costs and is predicted to lose."""

    table: SensitivityTable
    choice: tuple[int, ...]  # candidate index per group
    budget_bits: float  # average effective bits per weight allowed
    solver: str  # how the choice was made, for the recipe's header
    notes: tuple[str, ...] = field(default=())

    @property
    def per_layer(self) -> dict[str, Candidate]:
        return {layer: self.table.candidates[c]
                for group, c in zip(self.table.groups, self.choice, strict=True)
                for layer in group.layers}

    @property
    def stored_bytes(self) -> int:
        return self.table.bytes_of(self.choice)

    @property
    def average_bits(self) -> float:
        """Stored bits (codes, scales, zero points) per weight of the planned layers."""
        return 8 * self.stored_bytes / self.table.weights

    @property
    def predicted_sensitivity(self) -> float:
        return float(sum(self.table.sensitivity[g, c] for g, c in enumerate(self.choice)))


# ---------------------------------------------------------------- measurement


def measure_sensitivity(
    model: nn.Module,
    calibration: Sequence[Batch],
    candidates: Sequence[Candidate],
    measure: Measure = "kl",
    targets: Sequence[str] = ("*",),
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> SensitivityTable:
    """s[g, f] for every fused group g of the targeted Linears and candidate f (see top)."""
    import fnmatch

    if not calibration:
        raise ValueError("measuring sensitivity needs calibration batches")
    linears: dict[str, nn.Module] = {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatchcase(name, p) for p in targets)
        and not any(fnmatch.fnmatchcase(name, p) for p in ignore)
    }
    if not linears:
        raise ValueError(f"no Linear layer matches targets {list(targets)} and ignore {list(ignore)}")
    need_sigma = measure == "hessian" or any(c.method == "gptq" for c in candidates)
    groups, Sigma, base = _observe(model, linears, calibration, need_sigma, measure == "kl")
    S = torch.zeros(len(groups), len(candidates), dtype=torch.float64)  # (groups, candidates)
    with torch.no_grad():
        for g, group in enumerate(groups):
            Ws = [_weight(linears[name]).to(torch.float32, copy=True) for name in group.layers]
            sigma = Sigma.get(group.layers[0])
            for f, candidate in enumerate(candidates):
                # fused layers share Sigma, so GPTQ on their stacked rows is each layer's own result
                W_hat = candidate.quantize(torch.cat(Ws), sigma)  # (sum out, in)
                parts = torch.split(W_hat, [W.shape[0] for W in Ws])
                if measure == "hessian":
                    assert sigma is not None
                    D = torch.cat(Ws) - W_hat  # dW: (sum out, in)
                    S[g, f] = float(((D @ sigma) * D).sum())  # tr(dW Sigma dW^T)
                    continue
                for name, part in zip(group.layers, parts, strict=True):
                    _weight(linears[name]).copy_(part)
                try:
                    S[g, f] = _mean_kl(model, calibration, base)
                finally:
                    for name, W in zip(group.layers, Ws, strict=True):
                        _weight(linears[name]).copy_(W)
            log.debug("sensitivity of %s: %s", group.name, S[g].tolist())
    return SensitivityTable(tuple(groups), tuple(candidates), S, measure)


def _observe(
    model: nn.Module, linears: dict[str, nn.Module], calibration: Sequence[Batch],
    need_sigma: bool, need_logprobs: bool,
) -> tuple[list[LayerGroup], dict[str, Tensor], list[Tensor]]:
    """One base forward pass: fused groups (layers called on the same input object), each
    group's Sigma = X^T X / n (in, in) if asked, and base log-probs of the real tokens."""
    # (layer, fed the same input object as the layer called just before) in call order, first
    # batch only; the previous input is held, so identity is not confused by a reused address
    order: list[tuple[str, bool]] = []
    previous: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    last: dict[str, Any] = {}
    first = {"batch": True}

    def hook(name: str, args: tuple[Tensor, ...]) -> None:
        X = args[0]
        if first["batch"]:
            order.append((name, previous.get("input") is X))
            previous["input"] = X
        if not need_sigma:
            return
        if last.get("input") is not X:  # q/k/v share one input: X^T X once
            X2 = real_tokens(X.detach()).to(torch.float32)  # (tokens, in)
            last.update(input=X, product=X2.T @ X2, tokens=int(X2.shape[0]))
        sums[name] = sums.get(name, 0) + last["product"]
        counts[name] = counts.get(name, 0) + last["tokens"]

    handles = [m.register_forward_pre_hook(lambda _m, a, n=name: hook(n, a)) for name, m in linears.items()]
    base: list[Tensor] = []
    try:
        with torch.no_grad():
            for batch in calibration:
                with calibration_tokens(batch.get("attention_mask")):
                    logits = _logits(model, batch)
                first["batch"] = False
                last.clear()
                if need_logprobs:
                    base.append(_real_logprobs(logits, batch))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[LayerGroup] = []
    seen: set[str] = set()
    previous.clear()
    for name, shares_input in order:
        if name in seen:
            continue  # a layer called twice (shared weights) keeps its first group
        seen.add(name)
        weight = _weight(linears[name])
        shape = (int(weight.shape[0]), int(weight.shape[1]))  # (out, in)
        if groups and shares_input:
            last_group = groups[-1]
            groups[-1] = LayerGroup(last_group.layers + (name,), last_group.shapes + (shape,))
        else:
            groups.append(LayerGroup((name,), (shape,)))
    unused = sorted(set(linears) - seen)
    if unused:
        raise ValueError(f"layers never called in the calibration pass: {', '.join(unused)}")
    Sigma = {name: sums[name] / counts[name] for name in sums}
    return groups, Sigma, base


def _weight(module: nn.Module) -> Tensor:
    """The Linear's weight tensor (out, in), detached: writes to it change the layer."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.detach()


def _logits(model: nn.Module, batch: Batch) -> Tensor:
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    output = model(**batch, **kwargs)
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError("measure 'kl' needs a model with logits (a causal LM); use measure 'hessian'")
    return logits


def _real_logprobs(logits: Tensor, batch: Batch) -> Tensor:
    """log p over the vocabulary at the unpadded positions: (tokens, vocab)."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)  # (batch, seq, vocab)
    mask = batch.get("attention_mask")
    return logp[mask.bool()] if mask is not None else logp.reshape(-1, logp.shape[-1])


def _mean_kl(model: nn.Module, calibration: Sequence[Batch], base: Sequence[Tensor]) -> float:
    """Mean over calibration tokens of KL(p || p^) = sum_v p_v (log p_v - log p^_v)."""
    total, tokens = 0.0, 0
    for batch, logp in zip(calibration, base, strict=True):
        logq = _real_logprobs(_logits(model, batch), batch)  # (tokens, vocab)
        total += float((logp.exp() * (logp - logq)).sum())
        tokens += int(logp.shape[0])
    return total / tokens


# ---------------------------------------------------------------- choice


def budget_bytes(table: SensitivityTable, budget_bits: float | None, budget_mb: float | None) -> int:
    if (budget_bits is None) == (budget_mb is None):
        raise ValueError("give exactly one of budget_bits (average bits per weight) and budget_mb")
    if budget_bits is not None:
        return math.floor(budget_bits * table.weights / 8)
    assert budget_mb is not None
    return math.floor(budget_mb * 2**20)


def solve(table: SensitivityTable, budget_bits: float | None = None, budget_mb: float | None = None) -> Plan:
    """The assignment of least total sensitivity within the budget (multiple-choice knapsack).

    dp_g[c] = min over f of dp_{g-1}[c - w[g, f]] + s[g, f]: the least sensitivity of the
    first g groups within c budget units; backtracking from dp_G[C] gives the choice.
    Exact when the budget fits MAX_STATES units of one byte's gcd; otherwise costs are
    rounded up to coarser units (never over budget, possibly not optimal; logged).
    """
    limit = budget_bytes(table, budget_bits, budget_mb)
    w = [[group.stored_bytes(c) for c in table.candidates] for group in table.groups]  # bytes
    unit = math.gcd(*[x for row in w for x in row])
    exact = limit // unit <= MAX_STATES
    if not exact:
        unit = -(-limit // MAX_STATES)
        log.info("mixed precision: budget in units of %d bytes; the choice may be near-optimal", unit)
    C = limit // unit
    cost = torch.tensor([[-(-x // unit) for x in row] for row in w])  # (groups, candidates)
    S = table.sensitivity
    dp = torch.zeros(C + 1, dtype=torch.float64)  # no group yet: 0 at any capacity
    choice = torch.zeros(len(table.groups), C + 1, dtype=torch.int64)
    for g in range(len(table.groups)):
        new = torch.full((C + 1,), math.inf, dtype=torch.float64)
        for f in range(len(table.candidates)):
            k = int(cost[g, f])
            if k > C:
                continue
            value = torch.full((C + 1,), math.inf, dtype=torch.float64)
            value[k:] = dp[: C + 1 - k] + float(S[g, f])
            better = value < new
            new = torch.where(better, value, new)
            choice[g] = torch.where(better, torch.full_like(choice[g], f), choice[g])
        dp = new
    if math.isinf(float(dp[C])):
        least = sum(min(row) for row in w)
        raise ValueError(f"budget of {8 * limit / table.weights:.3f} bits per weight is below the "
                         f"smallest assignment ({8 * least / table.weights:.3f} bits per weight)")
    picked = []
    c = C
    for g in reversed(range(len(table.groups))):
        f = int(choice[g, c])
        picked.append(f)
        c -= int(cost[g, f])
    solver = ("exact dynamic program (multiple-choice knapsack) over the budget in "
              f"{unit}-byte units" + ("" if exact else ", costs rounded up"))
    return Plan(table, tuple(reversed(picked)), 8 * limit / table.weights, solver)


def plan_mixed_precision(
    model: nn.Module,
    calibration: Sequence[Batch],
    candidates: Sequence[Candidate],
    budget_bits: float | None = None,
    budget_mb: float | None = None,
    measure: Measure = "kl",
    targets: Sequence[str] = ("*",),
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> Plan:
    """Measure each fused group's sensitivity to each candidate, then solve the budget."""
    table = measure_sensitivity(model, calibration, candidates, measure, targets, ignore)
    plan = solve(table, budget_bits=budget_bits, budget_mb=budget_mb)
    log.info("mixed precision: %.3f bits per weight (budget %.3f), predicted %s %.4g",
             plan.average_bits, plan.budget_bits, measure, plan.predicted_sensitivity)
    return plan


def uniform_plan(table: SensitivityTable, candidate: int) -> Plan:
    """Every group in candidate `candidate` (a baseline)."""
    choice = tuple(candidate for _ in table.groups)
    bits = 8 * table.bytes_of(choice) / table.weights
    return Plan(table, choice, bits, f"uniform {table.candidates[candidate].label}")


def random_plan(table: SensitivityTable, budget_bits: float, seed: int) -> Plan:
    """A random assignment that fills the budget (a baseline): start every group at its
    cheapest candidate, then move random groups to random dearer candidates while the
    total fits, until no move fits."""
    rng = random.Random(seed)
    limit = math.floor(budget_bits * table.weights / 8)
    cost = [[g.stored_bytes(c) for c in table.candidates] for g in table.groups]
    choice = [row.index(min(row)) for row in cost]
    total = sum(cost[g][f] for g, f in enumerate(choice))
    while True:
        moves = [(g, f) for g in range(len(cost)) for f in range(len(table.candidates))
                 if cost[g][f] > cost[g][choice[g]] and total - cost[g][choice[g]] + cost[g][f] <= limit]
        if not moves:
            break
        g, f = rng.choice(moves)
        total += cost[g][f] - cost[g][choice[g]]
        choice[g] = f
    return Plan(table, tuple(choice), budget_bits, f"random (seed {seed})")


# ---------------------------------------------------------------- recipe


def plan_to_recipe(
    plan: Plan, base_recipe: dict[str, Any], stage_name: str = "mixed-precision",
    template: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`base_recipe` with a stage holding one quantization step per format used.

    The stage named `stage_name` is replaced if the base has one, else appended. Steps
    are ordered by bits; their `targets` list exact layer names (disjoint by construction);
    their other fields come from `template` (the step the plan replaces).
    """
    by_candidate: dict[int, list[str]] = {}
    for group, c in zip(plan.table.groups, plan.choice, strict=True):
        by_candidate.setdefault(c, []).extend(group.layers)
    steps = [plan.table.candidates[c].step(by_candidate[c], template)
             for c in sorted(by_candidate, key=lambda c: (plan.table.candidates[c].bits, c))]
    stage = {"name": stage_name, "steps": steps}
    recipe = dict(base_recipe)
    stages = list(recipe.get("stages") or [])
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    if stage_name in names:
        stages[names.index(stage_name)] = stage
    else:
        stages.append(stage)
    recipe["stages"] = stages
    return recipe


def write_recipe(recipe: dict[str, Any], path: Path, plan: Plan) -> Path:
    """Write `recipe` as YAML under a comment header: the budget, how the formats were
    chosen, and each group's sensitivity per candidate, so a person can edit and rerun it."""
    import yaml

    table = plan.table
    header = [
        f"Mixed precision chosen by squeezeflow on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        f"Budget: {plan.budget_bits:.3f} bits per weight (codes + fp16 scales + zero points) "
        f"over {table.weights} weights in {len(table.groups)} fused groups.",
        f"Achieved: {plan.average_bits:.3f} bits per weight, {plan.stored_bytes} bytes; "
        f"predicted total sensitivity ({table.measure}) {plan.predicted_sensitivity:.4g}.",
        f"Chosen by: {plan.solver}; sensitivity = "
        + ("mean KL(base || quantized) of the next-token distribution on calibration text, "
           "one group quantized at a time." if table.measure == "kl"
           else "tr(dW Sigma dW^T), the layer output error on calibration inputs."),
        "Edit a step's targets to move layers between formats (q/k/v and gate/up share one).",
        "",
        "group: " + " | ".join(c.label for c in table.candidates) + "  (* = chosen)",
    ]
    for g, group in enumerate(table.groups):
        cells = [f"{float(table.sensitivity[g, f]):.3g}{'*' if f == plan.choice[g] else ''}"
                 for f in range(len(table.candidates))]
        header.append(f"  {group.name}: " + " | ".join(cells))
    text = "".join(f"# {line}".rstrip() + "\n" for line in header)
    text += yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, width=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a recipe
    return path
