"""Memory preflight: the peak resident memory of each stage and of evaluation, before
any weights load, from the model's tensor shapes and the recipe's settings.

The estimate follows what the code holds today (`tasks/stages.py`, `runners.py`,
`artifact.py`, `evaluation/suite.py`), as an upper bound:

- a streamed stage (block-wise steps, `compression/streaming.py`) holds one block in
  fp32 or the embeddings and head, the calibration inputs once, and one block's
  Hessians: its estimate does not grow with depth (`_estimate_streamed`);
- any other stage loads its whole source model in fp32 (4 bytes per parameter, whatever
  the stored dtype); quantizing steps attach uint8 codes (1 byte per quantized weight);
- saving serializes every tensor to bytes (safetensors) besides the packed codes, once
  the calibration data and Hessians are freed: the peak holds the larger of the two;
- the layer-wise runner keeps every calibration batch's block inputs (hidden states,
  rotary tables, attention mask) twice while it recomputes them, and the steps that
  observe input Gram matrices (GPTQ/SparseGPT Hessians) keep one (in, in) fp32 matrix
  per Linear of the current block; the basic runner's Gram steps keep one per Linear
  of the whole model;
- a training stage holds the student, its gradients, Adam's two moments and the teacher;
- evaluation holds base (fp32) and candidate (packed) and one batch's logits.

Shapes come from safetensors headers (`ModelShape.from_folder`: a few KB read, no
torch) or from a model built on the meta device (`ModelShape.from_module`).
Accuracy against measured peaks: benchmarks/README.md "Memory preflight".
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.config import Needs, StepConfig

if TYPE_CHECKING:
    from torch import nn

FP32 = 4  # bytes: models, activations and Hessians are held in fp32
CODE_BYTES = 1  # QuantizedWeight.codes is uint8 in memory, whatever the bit width
# Measured: `import squeezeflow.tasks.stages` (torch, transformers, prefect, mlflow)
# peaks at 1.07 GB RSS (Linux, torch 2.14 CPU build); everything runs on top of it.
RUNTIME_BYTES = 1_100 * 2**20
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32, one of each per trained parameter
# Steps whose observers keep an (in, in) fp32 Gram matrix per selected Linear (their
# step.py: Hessian / InputGram); the others keep per-channel vectors, negligible here.
# fp32 (rows, in) copies of one Linear alive while a step changes it (its weight read as
# fp32, the step's copy, the quantizer's scaled and rounded temporaries, the dequantized
# value, their difference): measured, RTN of an 8B Llama streamed peaked at 3295 MB,
# 2.4 GB above the runtime with 0.87 GB of fp32 block weights; its gate_proj is 235 MB.
WORKING_COPIES = 6
INPUT_GRAM_KINDS = frozenset({"gptq", "sparsegpt", "qmoe", "lowrank"})
TRAINING_NEEDS = {Needs.TRAINING, Needs.TEACHER}
_BLOCK_NAME = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class DataSize:
    """How much data a phase pushes through the model at once."""

    num_samples: int
    max_length: int
    batch_size: int


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its tensors' shapes and a few config sizes."""

    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    disk_bytes: int = 0  # the weights files, memory-mapped while loading

    @classmethod
    def from_folder(cls, folder: Path) -> ModelShape:
        """From config.json and the safetensors headers (the first 8 bytes + JSON)."""
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no .safetensors files to read shapes from")
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            shapes |= {name: tuple(entry["shape"]) for name, entry in header.items()
                       if name != "__metadata__"}
        config = json.loads((folder / "config.json").read_text())
        return cls.from_config(shapes, config, sum(f.stat().st_size for f in files))

    @classmethod
    def from_module(cls, model: nn.Module, config: dict[str, Any]) -> ModelShape:
        """From a model built on the meta device (`compression.models.skeleton`)."""
        shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        return cls.from_config(shapes, config, 0)

    @classmethod
    def from_config(cls, shapes: dict[str, tuple[int, ...]], config: dict[str, Any],
                    disk_bytes: int) -> ModelShape:
        hidden = _first(config, "hidden_size", "d_model", "n_embd", "dim")
        return cls(
            shapes=shapes, hidden=hidden,
            intermediate=_first(config, "intermediate_size", "ffn_dim", "n_inner",
                                default=4 * hidden),  # 4x: the GPT-2 convention when unset
            vocab=_first(config, "vocab_size"),
            heads=_first(config, "num_attention_heads", "n_head", "num_heads"),
            disk_bytes=disk_bytes,
        )

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def block_linears(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, (out, in)) of the 2-D weights of the first repeated block."""
        counts: dict[str, set[str]] = {}
        for name in self.shapes:
            if match := _BLOCK_NAME.match(name):
                counts.setdefault(match["prefix"], set()).add(match["index"])
        if not counts:
            return []
        prefix = max(counts, key=lambda p: len(counts[p]))
        return [(name, shape) for name, shape in self.shapes.items()
                if name.startswith(f"{prefix}.0.") and name.endswith("weight") and len(shape) == 2]

    def block_parameters(self) -> tuple[int, int]:
        """(parameters of one repeated block, number of blocks); (0, 0) without blocks."""
        indices: dict[str, set[str]] = {}
        for name in self.shapes:
            if match := _BLOCK_NAME.match(name):
                indices.setdefault(match["prefix"], set()).add(match["index"])
        if not indices:
            return 0, 0
        prefix = max(indices, key=lambda p: len(indices[p]))
        first = sum(math.prod(shape) for name, shape in self.shapes.items()
                    if name.startswith(f"{prefix}.0."))
        return first, len(indices[prefix])

    def linears(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, (out, in)) of every 2-D weight but the embeddings and the head."""
        return [(name, shape) for name, shape in self.shapes.items()
                if len(shape) == 2 and name.endswith("weight") and self.vocab not in shape]


@dataclass(frozen=True)
class PhaseEstimate:
    """Peak resident bytes of one phase, by what holds them."""

    phase: str  # "stage <name>" or "evaluation"
    model: int  # weights held throughout: fp32 copies, the mapped files, quantized codes
    activations: int  # calibration inputs kept between blocks, one batch's intermediates
    hessians: int  # input Gram matrices (GPTQ/SparseGPT Hessians)
    optimizer: int  # gradients, Adam moments and the teacher of a training stage
    saving: int = 0  # the output serialized in memory, after the steps freed the above
    overhead: int = RUNTIME_BYTES  # the interpreter with torch, transformers, prefect, mlflow

    @property
    def total(self) -> int:
        """Measured: the data, Hessians and optimizer are freed before the model is
        saved (peak RSS of a GPTQ stage was the same at 32 x 128 and 128 x 256 tokens),
        so the peak holds the larger of the two, not both."""
        working = self.activations + self.hessians + self.optimizer
        return self.model + self.overhead + max(working, self.saving)

    def parts(self) -> dict[str, int]:
        return {"model": self.model, "activations": self.activations, "hessians": self.hessians,
                "optimizer": self.optimizer, "saving": self.saving, "overhead": self.overhead}

    @property
    def dominant(self) -> str:
        return max(self.parts().items(), key=lambda item: item[1])[0]

    def describe(self) -> str:
        parts = ", ".join(f"{'then ' if name == 'saving' else ''}{name} {format_bytes(size)}"
                          for name, size in self.parts().items() if size)
        return f"{self.phase}: {format_bytes(self.total)} ({parts})"


def estimate_stage(name: str, steps: Sequence[StepConfig], shape: ModelShape,
                   calibration: DataSize | None, training: DataSize | None,
                   stream: bool | None = None) -> PhaseEstimate:
    """Peak of one stage run as `compression/executor.py` runs it: streamed block by
    block when the steps allow it (`stream` None: decide as the executor does from the
    configs), else load, steps, save."""
    needs = {CATALOG.entry(step.kind).config_cls.needs for step in steps}
    P = shape.parameters
    weights = P * FP32 + shape.disk_bytes  # fp32 copy + the mapped files it was read from
    if needs & TRAINING_NEEDS:
        data = training or DataSize(1, 2, 1)
        teacher = P * FP32 if Needs.TEACHER in needs else 0  # teacher: the base, upper bound
        return PhaseEstimate(
            phase=f"stage {name}", model=weights, activations=_training_activations(shape, data),
            hessians=0, optimizer=P * FP32 * (1 + ADAM_STATES) + teacher,  # grads + moments
            saving=_output_bytes(steps, shape),
        )
    if stream is None:
        stream = streams(steps)
    if stream and shape.block_parameters()[1]:
        return _estimate_streamed(name, steps, shape, calibration)
    quantized = sum(math.prod(s) for _, s in shape.linears()) if _quantizes(steps) else 0
    model = weights + quantized * CODE_BYTES
    activations = hessians = 0
    grams = [step for step in steps if step.kind in INPUT_GRAM_KINDS]
    if Needs.LAYERWISE in needs and calibration is not None:
        activations = 2 * _block_inputs(shape, calibration) + _forward_bytes(shape, calibration.batch_size,
                                                                           calibration.max_length, False)
        activations += _paused_forwards(steps, shape, calibration)
        if grams:
            inputs = [s[1] for _, s in shape.block_linears()]
            # one Gram per Linear per Gram step, plus the workspace of applying the largest
            hessians = len(grams) * sum(i * i for i in inputs) * FP32 + _solver_bytes(shape)
    elif Needs.CALIBRATION in needs and calibration is not None:
        activations = _forward_bytes(shape, calibration.batch_size, calibration.max_length, True)
        if grams:
            hessians = len(grams) * sum(s[1] ** 2 for _, s in shape.linears()) * FP32
    return PhaseEstimate(phase=f"stage {name}", model=model, activations=activations,
                         hessians=hessians, optimizer=0, saving=_output_bytes(steps, shape))


def streams(steps: Sequence[StepConfig]) -> bool:
    """Whether the stage executor streams these steps block by block (the config-level
    part of `compression/streaming.py: streaming_blocker`)."""
    for step in steps:
        config_cls = CATALOG.entry(step.kind).config_cls
        if config_cls.needs in TRAINING_NEEDS or config_cls.changes_structure:
            return False
        if getattr(step, "backend", None) == "gptqmodel":  # writes its checkpoint itself
            return False
        if step.needs_whole_model:  # from the config: no step import (torch)
            return False
    return True


def _estimate_streamed(name: str, steps: Sequence[StepConfig], shape: ModelShape,
                       calibration: DataSize | None) -> PhaseEstimate:
    """A streamed stage holds one block in fp32 (with its codes) or the modules outside
    the blocks (embeddings, head: loaded to make the first block's inputs, then again at
    the end), whichever is larger, with the working copies of its largest Linear while a
    step changes it (WORKING_COPIES); the calibration inputs once (replaced batch by
    batch), one batch through the block, and the block's Hessians with the solver's
    workspace."""
    block, count = shape.block_parameters()
    outside = shape.parameters - block * count
    linears = [math.prod(s) for _, s in shape.block_linears()]
    codes = sum(linears) * CODE_BYTES if _quantizes(steps) else 0
    working = WORKING_COPIES * max(linears, default=0) * FP32
    model = max(block * FP32 + codes, outside * FP32) + working
    needs = {CATALOG.entry(step.kind).config_cls.needs for step in steps}
    activations = hessians = 0
    if needs & {Needs.LAYERWISE, Needs.CALIBRATION} and calibration is not None:
        activations = _block_inputs(shape, calibration) + _forward_bytes(
            shape, calibration.batch_size, calibration.max_length, False)
        activations += _paused_forwards(steps, shape, calibration)
        grams = [step for step in steps if step.kind in INPUT_GRAM_KINDS]
        if grams:
            inputs = [s[1] for _, s in shape.block_linears()]
            hessians = len(grams) * sum(i * i for i in inputs) * FP32 + _solver_bytes(shape)
    return PhaseEstimate(phase=f"stage {name}", model=model, activations=activations,
                         hessians=hessians, optimizer=0)


def estimate_evaluation(shape: ModelShape, stages: Sequence[Sequence[StepConfig]],
                        evaluation: DataSize) -> PhaseEstimate:
    """Base (fp32) and candidate (as packed as the last quantizing stage left it) loaded
    together, plus one evaluation batch through the model with its logits."""
    candidate = shape.parameters * FP32
    for steps in stages:
        if _quantizes(steps):
            candidate = min(candidate, _output_bytes(steps, shape))
    return PhaseEstimate(
        phase="evaluation", model=shape.parameters * FP32 + shape.disk_bytes + candidate,
        activations=_forward_bytes(shape, evaluation.batch_size, evaluation.max_length, True),
        hessians=0, optimizer=0,
    )


@dataclass(frozen=True)
class Plan:
    """A recipe's phases on one model: what the preflight estimates and inverts."""

    shape: ModelShape
    stages: tuple[tuple[str, tuple[StepConfig, ...]], ...]  # (stage name, its steps)
    calibration: DataSize | None
    training: DataSize | None
    evaluation: DataSize

    def estimates(self) -> list[PhaseEstimate]:
        """One estimate per stage, in order, then evaluation's."""
        stages = [estimate_stage(name, steps, self.shape, self.calibration, self.training)
                  for name, steps in self.stages]
        return [*stages, estimate_evaluation(self.shape, [s for _, s in self.stages], self.evaluation)]

    def fitting_settings(self, phase: str, limit: int) -> list[Fit]:
        """For each data setting `phase` depends on, the largest value that fits `limit`
        with the others unchanged (the estimate grows with each: a bisection inverts it)."""
        sections = (["evaluation"] if phase == "evaluation"
                    else [name for name in ("calibration", "training") if getattr(self, name)])
        fits = []
        for section in sections:
            data: DataSize = getattr(self, section)
            for field, lowest in (("num_samples", 1), ("max_length", 2), ("batch_size", 1)):
                if (section, field) == ("evaluation", "num_samples"):
                    continue  # evaluation runs batch by batch: its sample count holds no memory
                current = getattr(data, field)

                def fits_at(value: int, section: str = section, data: DataSize = data,
                            field: str = field) -> bool:
                    changed = replace(data, **{field: value})
                    plan = (replace(self, evaluation=changed) if section == "evaluation" else
                            replace(self, training=changed) if section == "training" else
                            replace(self, calibration=changed))
                    return plan.total(phase) <= limit

                if not fits_at(current):
                    fits.append(Fit(f"{section}.{field}", current, _largest(lowest, current, fits_at)))
        return fits

    def total(self, phase: str) -> int:
        return next(e.total for e in self.estimates() if e.phase == phase)


@dataclass(frozen=True)
class Fit:
    """A setting that makes a phase fit: `setting <= value`, or None when none does."""

    setting: str  # e.g. "calibration.num_samples"
    current: int
    value: int | None

    def describe(self) -> str:
        if self.value is None:
            return f"{self.setting}: no value fits (now {self.current})"
        return f"{self.setting} <= {self.value} (now {self.current})"


def available_memory() -> int:
    """Bytes this process may use: the cgroup limit or MemAvailable, whichever is smaller."""
    candidates = []
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            candidates.append(int(limit))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)  # reported in kB
    except (OSError, ValueError):
        pass
    if not candidates:
        raise OSError("no memory limit readable (no /sys/fs/cgroup/memory.max nor /proc/meminfo)")
    return min(candidates)


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30,
          "GB": 2**30, "T": 2**40, "TB": 2**40}


def parse_bytes(text: str) -> int:
    """'8GB', '512M', '1.5G' -> bytes (binary units: 1 GB = 2**30 bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match[2].upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 8GB, 512MB, 1.5G")
    return int(float(match[1]) * _UNITS[unit])


def format_bytes(size: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def _first(config: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        if isinstance(config.get(key), int):
            return int(config[key])
    if default is None:
        raise ValueError(f"config.json has none of {', '.join(keys)}: cannot size the model")
    return default


def _quantizes(steps: Iterable[StepConfig]) -> bool:
    return any(isinstance(getattr(step, "bits", None), int) for step in steps)


def _output_bytes(steps: Sequence[StepConfig], shape: ModelShape) -> int:
    """The saved checkpoint, serialized in memory by safetensors before it is written:
    packed codes at the step's bit width (+ fp16 scales and zeros per group of 32 or
    more) for quantized Linears, fp32 for everything else."""
    bits = min((step.bits for step in steps if isinstance(getattr(step, "bits", None), int)),
               default=None)
    linear = sum(math.prod(s) for _, s in shape.linears())
    if bits is None:
        return shape.parameters * FP32
    packed = linear * bits // 8 + linear // 32 * 2 * 2  # codes + (scale, zero) per group
    return (shape.parameters - linear) * FP32 + 2 * packed  # packed tensors + their bytes


def _solver_bytes(shape: ModelShape) -> int:
    """The GPTQ/SparseGPT solve of one input width: 3 (in, in) matrices alive at once
    (H's scratch copy, overwritten by the factor, the other buffer of the in-place solve
    `upper_cholesky_of_inverse`, and a permuted copy with act order) and 4 (rows, in)
    ones (W, its transpose, codes, errors) for the Linears quantized together: those fed
    the same input, bounded here by all Linears of the block with that input width
    (measured: a hidden-2048 block's GPTQ peak was 0.9 GB above RTN's, against 0.6 GB
    of Hessians, when the solve held 6). SparseGPT factors in float64: its solve holds
    about twice this, which the estimate leaves out."""
    rows_by_width: dict[int, int] = {}
    for _, (rows, width) in shape.block_linears():
        rows_by_width[width] = rows_by_width.get(width, 0) + rows
    return max((3 * width * width + 4 * rows * width) * FP32
               for width, rows in rows_by_width.items())


def _block_inputs(shape: ModelShape, data: DataSize) -> int:
    """What the layer-wise runner keeps per calibration batch: hidden states (tokens,
    hidden), rotary cos and sin (tokens, head_dim) and a 4-D attention mask (batch, 1,
    seq, seq), all fp32, for every batch."""
    tokens = data.num_samples * data.max_length
    head_dim = shape.hidden // shape.heads
    return (tokens * (shape.hidden + 2 * head_dim) + data.num_samples * data.max_length ** 2) * FP32


def _paused_forwards(steps: Sequence[StepConfig], shape: ModelShape, data: DataSize) -> int:
    """A true-sequential step (`sequential: true`) keeps every batch's block forward alive
    at once (`compression/sequential.py`); at its largest pause, before the MLP's down
    projection, each holds the residual, the normed input and the MLP's intermediate."""
    if not any(getattr(step, "sequential", False) for step in steps):
        return 0
    return data.num_samples * data.max_length * (2 * shape.hidden + shape.intermediate) * FP32


def _forward_bytes(shape: ModelShape, batch: int, length: int, logits: bool) -> int:
    """One batch through one block (q/k/v/o and the MLP's intermediates, attention
    scores) and, for a whole-model pass, the logits with their log-softmax and loss."""
    tokens = batch * length
    block = tokens * (6 * shape.hidden + 3 * shape.intermediate) + batch * shape.heads * length ** 2
    head = 3 * tokens * shape.vocab if logits else 0
    return (block + head) * FP32


def _training_activations(shape: ModelShape, data: DataSize) -> int:
    """Activations saved for backward in every block, plus the student's and the
    teacher's logits with their softmaxes."""
    blocks = max(1, len({m["index"] for n in shape.shapes if (m := _BLOCK_NAME.match(n))}))
    per_block = _forward_bytes(shape, data.batch_size, data.max_length, False)
    return blocks * per_block + 2 * _forward_bytes(shape, data.batch_size, data.max_length, True)


def _largest(lowest: int, highest: int, fits: Callable[[int], bool]) -> int | None:
    """The largest value in [lowest, highest] for which `fits` holds (monotone), or None."""
    if not fits(lowest):
        return None
    while lowest < highest:
        middle = (lowest + highest + 1) // 2
        if fits(middle):
            lowest = middle
        else:
            highest = middle - 1
    return lowest
