"""Streaming, block-wise execution of one stage: models larger than memory.

The model is built on the meta device (no weights). What sits outside the repeated
blocks (embeddings, final norm, head) is read from the source folder first; then each
block in turn is read from the source's shards in its stored dtype (as fp32), moved
to the device, calibrated and compressed by the stage's steps, written to its own
output shard and released. Calibration activations exist for the current block only.
Peak memory is about one block in fp32 + the outside modules + one block's inputs,
whatever the depth.

Semantics are those of the in-memory runners (`compression/runners.py`):
- a layer-wise stage (any LAYERWISE step): each block sees what the compressed
  blocks before it produce (GPTQ-style);
- a calibration stage (CALIBRATION steps only): each block is observed on what the
  uncompressed model feeds it, as in one forward pass of the whole model;
- a stage needing no data: each block is compressed as it is read.
So a streamed stage writes the same weights an in-memory one would (tested).

Resume: with a `work` folder, every finished block leaves its shard, its reports and
the next block's inputs there (each file written whole); a run killed at block k
continues at block k, and gives bit-identical output. The caller names `work` by
everything the output depends on (the stage's content hash), so stale progress is
never picked up; an empty `work` starts from block 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from squeezeflow.compression.artifact import (
    FORMAT_FILE,
    PackedPart,
    packed_tensors,
    write_description,
)
from squeezeflow.compression.changes import STORED_PREFIX, model_digests, unchanged_error
from squeezeflow.compression.config import Needs
from squeezeflow.compression.formats import FORMATS
from squeezeflow.compression.models import (
    ModelKind,
    detect_kind,
    find_blocks,
    load_tokenizer,
    skeleton,
)
from squeezeflow.compression.progress import advance
from squeezeflow.compression.runners import (
    TRAINING_NEEDS,
    Batch,
    calibration_matmuls,
    capture_block_inputs,
    hidden_of,
    release_freed_memory,
    until_observed,
)
from squeezeflow.compression.sequential import Layouts, run_block_sequentially, sequential_step
from squeezeflow.compression.shards import (
    MERGE_LIMIT_BYTES,
    SINGLE_FILE,
    Shards,
    ShardWriter,
    merge_shards,
    write_tensors,
)
from squeezeflow.compression.step import Step, StepReport, calibration_tokens

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]
Mode = Literal["layerwise", "calibration", "none"]
STATE_FILE = "progress.json"
INPUTS_FILE = "inputs.safetensors"
SHARDS = "shards"


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, and torch sees no CUDA device here")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def stage_mode(steps: Sequence[Step[Any]]) -> Mode:
    needs = {step.needs for step in steps}
    if Needs.LAYERWISE in needs:
        return "layerwise"
    return "calibration" if Needs.CALIBRATION in needs else "none"


def read_description(folder: Path) -> dict[str, Any]:
    """The folder's squeezeflow.json ({} for a plain Hugging Face folder)."""
    path = Path(folder) / FORMAT_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}


def streaming_blocker(steps: Sequence[Step[Any]], source: Path) -> str | None:
    """Why this stage cannot stream from `source` (None: it can); read from configs only."""
    for step in steps:
        kind = step.config.kind
        if step.needs in TRAINING_NEEDS:
            return f"{kind} trains the whole model"
        if step.changes_structure:
            return f"{kind} changes the model's structure"
        if step.writes_checkpoint:
            return f"{kind} writes its checkpoint itself"
        if step.needs_whole_model:
            return f"{kind} runs the whole model"
    description = read_description(source)
    if description.get("factorized"):
        return "the source has factorized layers"
    for name in FORMATS.names():
        if description.get(name) and getattr(FORMATS.get(name), "dense_is_runtime", False):
            return f"the source stores {name} layers, whose runtime module is trained"
    model = skeleton(AutoConfig.from_pretrained(source), description.get("kind"))
    prefix, _ = find_blocks(model)
    inside = f"{prefix}."
    tied = description.get("tied", {})
    if any(name.startswith(inside) or source_name.startswith(inside)
           for name, source_name in tied.items()):
        return "the source ties tensors inside its blocks"
    if stage_mode(steps) == "calibration":
        for step in steps:
            outside = [name for name in step.select(model) if not name.startswith(inside)]
            if outside:
                return f"{step.config.kind} calibrates modules outside the blocks ({outside[0]})"
    return None


@dataclass
class _State:
    """What the finished blocks left: resumable, saved after every block."""

    next_block: int = 0
    reports: list[list[dict[str, Any]]] = field(default_factory=list)  # per step, per block
    specs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def load(cls, work: Path, steps: int) -> _State:
        path = work / STATE_FILE
        if not path.exists():
            return cls(reports=[[] for _ in range(steps)])
        saved = json.loads(path.read_text())
        return cls(**saved)

    def save(self, work: Path) -> None:
        partial = work / f".{STATE_FILE}.partial"
        partial.write_text(json.dumps(self.__dict__))
        os.replace(partial, work / STATE_FILE)

    def add(self, part: PackedPart) -> None:
        for format_name, layers in part.specs.items():
            self.specs.setdefault(format_name, {}).update(layers)
        self.tied.update(part.tied)


class _Loader:
    """Reads modules' tensors from the source folder into the meta skeleton, as fp32."""

    def __init__(self, model: PreTrainedModel, weights: Shards, description: dict[str, Any]) -> None:
        self.model = model
        self.weights = weights
        self.specs = {name: description[name] for name in FORMATS.names() if description.get(name)}
        self.tied: dict[str, str] = description.get("tied", {})

    def load(self, modules: dict[str, nn.Module]) -> None:
        """Give `modules` (by full name; their own tensors, not their children's) their
        values: non-persistent buffers computed as the model's init does, the rest read."""
        holders: dict[int, list[tuple[nn.Module, str]]] = {}  # a tensor tied in several places
        for module in modules.values():
            for attribute, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((module, attribute))
        for module in modules.values():  # e.g. rotary frequencies: computed, never stored
            transient = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
            for attribute in transient:
                buffer = module._buffers[attribute]
                assert buffer is not None
                module._buffers[attribute] = torch.empty_like(buffer, device="cpu")
            if transient:
                self.model._init_weights(module)
        stored: dict[str, tuple[Any, Any]] = {}  # layer -> (format, value) to attach once placed
        dense: dict[str, torch.Tensor] = {}
        for format_name, layers in self.specs.items():  # layers a format stores packed
            weight_format = FORMATS.get(format_name)
            for name, spec in layers.items():
                if name in modules:
                    value = weight_format.read(name, spec, self._taker(name))
                    stored[name] = (weight_format, value)
                    for parameter, tensor in weight_format.dense(modules[name], value).items():
                        dense[f"{name}.{parameter}"] = tensor
        missing = []
        for module_name, module in modules.items():
            for attribute, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or not tensor.is_meta:
                    continue  # absent, computed above, or placed through a tie
                key = f"{module_name}.{attribute}" if module_name else attribute
                source = self.tied.get(key, key)
                if key in dense:
                    value = dense.pop(key)
                elif source in self.weights:
                    value = self.weights.read(source)
                else:
                    missing.append(key)  # maybe tied to a tensor read later: checked below
                    continue
                self._place(key, tensor, value, holders[id(tensor)])
        unplaced = [key for key in missing if _tensor(self.model, key).is_meta]
        if unplaced:  # as from_pretrained does: initialized, with a warning
            log.warning("%s: weights missing from the checkpoint, newly initialized: %s",
                        self.weights.folder, ", ".join(unplaced))
            for key in unplaced:
                module_name, _, attribute = key.rpartition(".")
                module = self.model.get_submodule(module_name)
                meta = getattr(module, attribute)
                self._place(key, meta, torch.empty_like(meta, device="cpu"), holders[id(meta)])
            for module_name in sorted({key.rpartition(".")[0] for key in unplaced}):
                self.model._init_weights(self.model.get_submodule(module_name))
        for name, (weight_format, value) in stored.items():
            weight_format.attach(modules[name], value)

    def _place(self, key: str, meta: torch.Tensor, value: torch.Tensor,
               holders: list[tuple[nn.Module, str]]) -> None:
        if tuple(value.shape) != tuple(meta.shape):
            raise ValueError(f"{self.weights.folder}: {key} is stored as {tuple(value.shape)}, "
                             f"the config makes it {tuple(meta.shape)}")
        value = value.to(meta.dtype if meta.is_floating_point() else value.dtype).contiguous()
        placed: torch.Tensor = nn.Parameter(value, requires_grad=False) if isinstance(meta, nn.Parameter) else value
        for module, attribute in holders:
            if attribute in module._parameters:
                module._parameters[attribute] = placed  # type: ignore[assignment]
            else:
                module._buffers[attribute] = placed

    def _taker(self, layer: str) -> Callable[[str], torch.Tensor | None]:
        def take(suffix: str) -> torch.Tensor | None:
            key = f"{layer}.{suffix}"
            key = self.tied.get(key, key)
            return self.weights.read(key) if key in self.weights else None
        return take


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, attribute = key.rpartition(".")
    tensor: torch.Tensor = getattr(model.get_submodule(module_name), attribute)
    return tensor


def stream_stage(
    source: str | Path,
    steps: Sequence[Step[Any]],
    calibration: Sequence[Batch],
    output: str | Path,
    *,
    work: str | Path | None = None,
    device: Device | str = "cpu",
    name: str = "stage",
    metadata: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    single_file_bytes: int = MERGE_LIMIT_BYTES,
) -> list[StepReport]:
    """Apply `steps` (one stage) to the model folder `source`, block by block, writing
    the result to `output` (squeezeflow.json, tokenizer, manifest, and the weights: one
    `model.safetensors` up to `single_file_bytes`, else one shard per block + index);
    one report per step, as `run_stage_steps` returns.

    `work`: where finished blocks are kept until the stage completes, so that a killed
    run resumes at the block it reached (removed once `output` is written); None keeps
    them in a folder inside `output` (no resume). `device`: where each block is
    calibrated and compressed (`auto`: the GPU if there is one); the embeddings and
    head stay in CPU memory.
    """
    source, output = Path(source), Path(output)
    blocker = streaming_blocker(steps, source)
    if blocker is not None:
        raise ValueError(f"stage {name} cannot stream: {blocker}")
    mode = stage_mode(steps)
    if mode != "none" and not calibration:
        raise ValueError("this stage has steps that need calibration data, and none was given")
    target = resolve_device(device)
    release_freed_memory()
    description = read_description(source)
    config = AutoConfig.from_pretrained(source)
    kind: ModelKind = description.get("kind") or detect_kind(config)
    model = skeleton(config, kind, dtype=torch.float32)
    model.eval()
    prefix, blocks = find_blocks(model)
    work_folder = Path(work) if work is not None else output / ".blocks"
    work_folder.mkdir(parents=True, exist_ok=True)
    state = _State.load(work_folder, len(steps))
    writer = ShardWriter(work_folder / SHARDS, len(blocks) + 1)
    if state.next_block:
        log.info("stage %s: resuming at block %d/%d", name, state.next_block + 1, len(blocks))
    with Shards(source) as weights, torch.no_grad():
        loader = _Loader(model, weights, description)
        outside = {n: m for n, m in model.named_modules()
                   if n != prefix and not n.startswith(f"{prefix}.")}
        inputs: Inputs = []
        masks: list[torch.Tensor | None] = []
        if mode != "none" and state.next_block < len(blocks):
            loader.load(outside)  # the embeddings make the first block's inputs
            inputs = [_to(entry, target) for entry in capture_block_inputs(model, blocks[0], calibration)]
            masks = [_to(batch.get("attention_mask"), target) for batch in calibration]
            _release(outside.values())  # not needed again until the blocks are done
            if state.next_block:
                saved = load_file(str(work_folder / INPUTS_FILE), device=str(target))
                inputs = [((saved.pop(str(i)), *args[1:]), kwargs)
                          for i, (args, kwargs) in enumerate(inputs)]
        layouts: Layouts = {}  # true-sequential steps: the groups of each block layout
        for index in range(state.next_block, len(blocks)):
            block, block_name = blocks[index], f"{prefix}.{index}"
            loader.load({f"{block_name}.{n}" if n else block_name: m for n, m in block.named_modules()})
            block.to(target)
            before = model_digests(block)
            reports, inputs = _run_block(block, block_name, steps, mode, inputs, masks,
                                         last=index == len(blocks) - 1, layouts=layouts)
            state.changed = state.changed or model_digests(block) != before
            block.to("cpu")
            part = packed_tensors(block, block_name)
            writer.write(index, part.tensors)
            state.add(part)
            for step_reports, report in zip(state.reports, reports, strict=True):
                step_reports.append(report.model_dump())
            _release(block.modules())
            if inputs:
                write_tensors(work_folder / INPUTS_FILE, {str(i): args[0] for i, (args, _) in enumerate(inputs)})
            state.next_block = index + 1
            state.save(work_folder)
            _tell(progress, f"block {index + 1}/{len(blocks)} done")
            advance("calibration blocks" if mode != "none" else "blocks", index + 1, len(blocks))
        del inputs
        loader.load(outside)
        outside_reports = _run_outside(model, prefix, steps, mode)
        if not (state.changed or outside_reports):
            raise unchanged_error(name, [(step.config, len(step.select(model))) for step in steps])
        with _blocks_removed(model, prefix):
            part = packed_tensors(model)
        writer.write(len(blocks), part.tensors)
        state.add(part)
    output.mkdir(parents=True, exist_ok=True)
    shards = list(writer.shards())
    if sum(shard.stat().st_size for shard in shards) <= single_file_bytes:
        merge_shards(shards, output / SINGLE_FILE)  # what smaller HF checkpoints look like
    else:
        for shard in shards:
            os.replace(shard, output / shard.name)
        ShardWriter(output, len(blocks) + 1).finish()
    config.save_pretrained(output)
    load_tokenizer(source).save_pretrained(output)
    shutil.rmtree(work_folder, ignore_errors=True)
    write_description(output, kind, state.specs, state.tied, {}, metadata)  # manifest: last
    per_step = [[StepReport.model_validate(r) for r in saved] for saved in state.reports]
    for step_reports, extra in zip(per_step, outside_reports or [[] for _ in steps], strict=True):
        step_reports.extend(extra)
    return [step.finalize(model, reports) for step, reports in zip(steps, per_step, strict=True)]


def _run_block(
    block: nn.Module, block_name: str, steps: Sequence[Step[Any]], mode: Mode,
    inputs: Inputs, masks: list[torch.Tensor | None], last: bool, layouts: Layouts,
) -> tuple[list[StepReport], Inputs]:
    """Compress one block; return each step's report and the next block's inputs."""
    bf16 = all(step.calibration_precision == "bf16" for step in steps)
    sequential = sequential_step(steps) if mode == "layerwise" else None
    if sequential is not None:  # one forward per batch, compressing group by group
        report, outputs = run_block_sequentially(block, block_name, sequential, inputs, masks,
                                                 last, bf16, layouts)
        return [report], [] if last else [((output, *args[1:]), kwargs)
                                          for output, (args, kwargs) in zip(outputs, inputs, strict=True)]
    selected = [step.select(block, block_name) for step in steps]
    if mode != "none":
        with ExitStack() as observers, calibration_matmuls(bf16):
            for step, modules in zip(steps, selected, strict=True):
                observers.enter_context(step.observe(modules))
            if mode == "layerwise":  # outputs recomputed after apply: stop once observed
                forward = observers.enter_context(until_observed(steps, selected))
            for index, ((args, kwargs), mask) in enumerate(zip(inputs, masks, strict=True)):
                with calibration_tokens(mask):
                    if mode == "calibration":  # the next block sees the uncompressed outputs
                        output = block(*args, **kwargs)
                        inputs[index] = ((hidden_of(output), *args[1:]), kwargs)  # one copy alive
                    else:
                        forward(block, args, kwargs)
    reports = [step.apply(modules) for step, modules in zip(steps, selected, strict=True)]
    if mode == "layerwise" and not last:  # the next block sees what the compressed one gives
        with calibration_matmuls(bf16):
            for index, (args, kwargs) in enumerate(inputs):
                inputs[index] = ((hidden_of(block(*args, **kwargs)), *args[1:]), kwargs)
    return reports, inputs if not last else []


def _run_outside(
    model: nn.Module, prefix: str, steps: Sequence[Step[Any]], mode: Mode
) -> list[list[StepReport]] | None:
    """Steps that need no data also compress what they select outside the blocks, as the
    in-memory runner does; a layer-wise stage skips those modules (with a warning).
    None when nothing outside changed."""
    inside = f"{prefix}."
    selected = [{n: m for n, m in step.select(model).items() if not n.startswith(inside)}
                for step in steps]
    if not any(selected):
        return None
    if mode == "layerwise":
        names = sorted(n for modules in selected for n in modules)
        log.warning("layer-wise steps skipped modules outside the blocks: %s", ", ".join(names))
        return None
    with _blocks_removed(model, prefix):
        before = model_digests(model)
    reports = [[step.apply(modules)] if modules else [] for step, modules in zip(steps, selected, strict=True)]
    with _blocks_removed(model, prefix):
        changed = model_digests(model) != before
    return reports if changed else None


@contextmanager
def _blocks_removed(model: nn.Module, prefix: str) -> Iterator[None]:
    """The model without its blocks while inside (they are on the meta device by then)."""
    parent_name, _, attribute = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, attribute, blocks)


def _release(modules: Iterable[nn.Module]) -> None:
    """Free what `modules` hold (their own tensors, not their children's): tensors back to
    the meta device (a tensor tied in several places stays tied), stored values dropped."""
    replaced: dict[int, torch.Tensor] = {}
    for module in modules:
        for attribute in [a for a in vars(module) if a.startswith(STORED_PREFIX)]:
            delattr(module, attribute)
        for table in (module._parameters, module._buffers):
            for attribute, tensor in table.items():
                if tensor is None or tensor.is_meta:
                    continue
                if id(tensor) not in replaced:
                    meta = torch.empty_like(tensor, device="meta")
                    replaced[id(tensor)] = (
                        nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
                    )
                table[attribute] = replaced[id(tensor)]  # type: ignore[assignment]


def _to(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in tuples, lists, dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _tell(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)
    log.debug(message)
