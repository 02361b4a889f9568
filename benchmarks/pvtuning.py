"""PV-Tuning vs straight-through estimation (STE) on a 2-bit test LM.

The test LM of the test suite (tiny Llama: 2 blocks, hidden 64, MLP 128, trained 150
steps on the sample sentences, seed 0; or `--model FOLDER`) is quantized to 2 bits
(symmetric, one grid per output row) by `rtn` and by `gptq` (64 calibration sentences,
seed 11). From each starting point the `pv_tune` step trains the same parameters for
the same number of steps on the same 256 sentences (seed 13), against the base model's
logits, once with tau = 0.01 (PV-Tuning) and once with tau = 1 (every code re-rounded
every step: STE), over a sweep of P-step rates; both also with every unquantized
parameter trained (norms, embeddings, head) at the middle rate. "V only" (`codes:
false`) keeps every code and trains the scales alone: the paper's "continuous
parameters only". Perplexity is measured on 128 held-out sentences (seed 12).
`--seed S` changes the training sentences (seed 13 + S) and their order (seed S).

`--ablations` adds, at the middle rate: tau / 3 and 3 tau; the subspace chosen as in the
authors' code (largest |Y - W_hat|, instead of the largest decrease of the P step's
objective); the buffer's Adam with its default betas (0.9, 0.999) instead of (0, 0.95).

Usage: python benchmarks/pvtuning.py [--model FOLDER] [--steps 200] [--p-lrs 3e-3,1e-2,3e-2]
       [--v-lr 1e-3] [--tau 0.01] [--starts rtn,gptq] [--seed 0] [--threads 1] [--ablations]
Last line: one JSON object {start: {"base", "quantized", "v_only", "ste": {p_lr: ppl},
"pv": {p_lr: ppl}, ...}, "cpu": ..., "seconds": ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from squeezeflow import sampledata
from squeezeflow.compression.artifact import load_compressed
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.quantization.pvtuning import math as pv
from squeezeflow.compression.quantization.pvtuning import step as pv_step
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.step import TrainingContext
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.settings import apply_defaults, quiet_progress_bars
from squeezeflow.testing import save_model, tiny_llama, train_causal_lm

STARTS = {  # 2 bits, symmetric, one grid per output row: the codes carry most of the error
    "rtn": {"kind": "rtn", "bits": 2, "group_size": None, "symmetric": True},
    "gptq": {"kind": "gptq", "bits": 2, "group_size": None, "symmetric": True},
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def batches(tokenizer: Any, count: int, seed: int) -> list[dict[str, Tensor]]:
    texts = sampledata.sentences(count, seed=seed)
    return list(tokenized_batches(texts, tokenizer, batch_size=16, max_length=32))


def farthest_first(C: Tensor, Y: Tensor, W_hat: Tensor, s: Tensor, z: Tensor, g_idx: Tensor,
                   bits: int, tau: float, input_scale: Tensor | None = None) -> Tensor:
    """The authors' subspace: the ceil(tau * n) coordinates farthest from their grid point."""
    rounded = pv.nearest_codes(Y, s, z, g_idx, bits, input_scale)
    moved = (Y - W_hat).abs().reshape(-1)
    S = torch.topk(moved, pv.changed_budget(tau, moved.numel()), sorted=False).indices
    new = C.clone().reshape(-1)
    new[S] = rounded.reshape(-1)[S].to(C.dtype)
    return new.reshape(C.shape)


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Swap one design choice of the step for the ablation `name` while inside."""
    saved_p_step, saved_betas = pv.p_step, pv_step.P_BETAS
    if name == "farthest-first":
        pv.p_step = farthest_first  # type: ignore[assignment]
    elif name == "adam-default-betas":
        pv_step.P_BETAS = (0.9, 0.999)
    try:
        yield
    finally:
        pv.p_step, pv_step.P_BETAS = saved_p_step, saved_betas  # type: ignore[assignment]


def tune(model: nn.Module, teacher: Path, training: list[dict[str, Tensor]], scratch: Path,
         seed: int, **options: Any) -> tuple[nn.Module, dict[str, float]]:
    student = copy.deepcopy(model)
    step = CATALOG.build(CATALOG.parse({"kind": "pv_tune", **options}))
    folder = Path(tempfile.mkdtemp(dir=scratch))
    context = TrainingContext(batches=training, folder=folder, teacher=teacher, seed=seed)
    [report] = run_stage_steps(student, [step], training=context)
    return student, report.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--p-lrs", default="3e-3,1e-2,3e-2")
    parser.add_argument("--v-lr", type=float, default=1e-3)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--starts", default=",".join(STARTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ablations", action="store_true")
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    torch.set_num_threads(args.threads)  # tiny matmuls: a second thread only adds contention
    started = time.perf_counter()
    p_lrs = [float(x) for x in args.p_lrs.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="pvtuning-"))
    teacher_dir = args.model
    if teacher_dir is None:
        model, tokenizer = tiny_llama(hidden=64, layers=2, intermediate=128)
        train_causal_lm(model, tokenizer, steps=150)
        teacher_dir = save_model(model, tokenizer, scratch / "base")
    loaded = load_compressed(teacher_dir)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    held_out, calibration = batches(tokenizer, 128, seed=12), batches(tokenizer, 64, seed=11)
    training = batches(tokenizer, 256, seed=13 + args.seed)
    starts = args.starts.split(",")
    base = perplexity(teacher, held_out)
    common = {"max_steps": args.steps, "v_lr": args.v_lr, "unquantized": "none"}
    results: dict[str, Any] = {}
    rows: list[tuple[str, str, float, float, float]] = []  # start, run, ppl, codes changed, s

    def run(start: str, label: str, model: nn.Module, **options: Any) -> float:
        t = time.perf_counter()
        student, metrics = tune(model, teacher_dir, training, scratch, args.seed,
                                **{**common, **options})
        ppl = perplexity(student, held_out)
        rows.append((start, label, ppl, metrics["codes_changed"], time.perf_counter() - t))
        print(f"  {start} {label}: ppl {ppl:.4f}", flush=True)
        return ppl

    for start in starts:
        config = STARTS[start]
        quantized = copy.deepcopy(teacher)
        run_stage_steps(quantized, [CATALOG.build(CATALOG.parse(config))], calibration)
        entry: dict[str, Any] = {"base": base, "quantized": perplexity(quantized, held_out),
                                 "ste": {}, "pv": {}}
        entry["v_only"] = run(start, "V only (codes: false)", quantized, codes=False)
        for p_lr in p_lrs:
            entry["ste"][str(p_lr)] = run(start, f"STE (tau 1), p_lr {p_lr:g}", quantized,
                                          tau=1.0, p_lr=p_lr)
            entry["pv"][str(p_lr)] = run(start, f"PV (tau {args.tau:g}), p_lr {p_lr:g}", quantized,
                                         tau=args.tau, p_lr=p_lr)
        middle = p_lrs[len(p_lrs) // 2]
        options = {"p_lr": middle, "unquantized": "all"}
        entry["ste_all"] = run(start, f"STE, p_lr {middle:g}, + all unquantized", quantized,
                               tau=1.0, **options)
        entry["pv_all"] = run(start, f"PV, p_lr {middle:g}, + all unquantized", quantized,
                              tau=args.tau, **options)
        if args.ablations:
            for tau in (args.tau / 3, args.tau * 3):  # the subspace's size
                entry[f"pv_tau_{tau:.4g}"] = run(start, f"PV (tau {tau:.4g}), p_lr {middle:g}",
                                                 quantized, tau=tau, p_lr=middle)
            for name in ("farthest-first", "adam-default-betas"):
                with variant(name):
                    entry[f"pv_{name}"] = run(start, f"PV, p_lr {middle:g}, {name}", quantized,
                                              tau=args.tau, p_lr=middle)
        results[start] = entry

    print()
    print(f"base perplexity {base:.4f}; {args.steps} steps, v_lr {args.v_lr:g}, seed {args.seed}")
    print("| start | run | ppl | excess over base | codes changed | seconds |")
    print("|---|---|---|---|---|---|")
    for start in starts:
        q = results[start]["quantized"]
        print(f"| {start} 2-bit | quantized, no tuning | {q:.4f} | {q - base:.4f} | 0 | - |")
        for row_start, label, ppl, changed, seconds in rows:
            if row_start == start:
                print(f"| {start} 2-bit | {label} | {ppl:.4f} | {ppl - base:.4f} | "
                      f"{changed:.3f} | {seconds:.1f} |")
    results["cpu"] = {"model": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": args.threads}
    results["steps"], results["seed"] = args.steps, args.seed
    results["seconds"] = time.perf_counter() - started
    print(json.dumps(results))


if __name__ == "__main__":
    main()
