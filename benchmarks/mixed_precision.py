"""Per-layer mixed precision at a bits-per-weight budget against uniform and random assignments.

A tiny Llama (default: the tests' model, 2 blocks, hidden 64, MLP 128, trained 150 steps)
is planned at `--budget` average bits per weight (codes + fp16 scales + zero points) with
candidates {2, 3, 4, 8} bits at one group size, for each quantizer (`rtn`, `gptq`) and
each sensitivity measure (`kl`, `hessian`). Every arm is applied through the written
recipe's steps (`run_stage_steps`) and measured: held-out perplexity, and the bytes the
integer format stores for the quantized Linears. Arms: the plan, uniform 3-bit, uniform
4-bit, and `--random` random assignments filling the same budget (seeds 0..n-1).

Usage: python benchmarks/mixed_precision.py [--budget 3.5] [--group-size 32] [--hidden 64]
       [--layers 2] [--steps 150] [--methods rtn,gptq] [--measures kl,hessian] [--random 3]
Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from torch import nn

from squeezeflow import sampledata
from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.data import tokenized_batches
from squeezeflow.compression.formats.base import stored_linears
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.compression.search.mixed_precision import (
    Candidate,
    Plan,
    plan_mixed_precision,
    plan_to_recipe,
    random_plan,
    uniform_plan,
)
from squeezeflow.evaluation.machine import cpu_model
from squeezeflow.evaluation.perplexity import perplexity
from squeezeflow.testing import tiny_llama, train_causal_lm


def stored_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for linear in stored_linears(model)
               for t in linear.format.tensors(linear.owner, linear.stored).values())


def measure_arm(model: nn.Module, plan: Plan, calibration: list[Any], evaluation: list[Any]) -> dict[str, Any]:
    recipe = plan_to_recipe(plan, {"stages": []})
    quantized = copy.deepcopy(model)
    run_stage_steps(quantized, [CATALOG.build(CATALOG.parse(s)) for s in recipe["stages"][-1]["steps"]],
                    calibration)
    return {"ppl": perplexity(quantized, evaluation), "bits": plan.average_bits,
            "bytes": stored_bytes(quantized), "choice": list(plan.choice)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.5)  # the acceptance budget
    parser.add_argument("--group-size", type=int, default=32)  # 3-bit g32 stores 3.59 bits/weight
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--measures", default="kl,hessian")
    parser.add_argument("--random", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = tiny_llama(hidden=args.hidden, layers=args.layers, intermediate=2 * args.hidden)
    train_causal_lm(model, tokenizer, steps=args.steps)
    calibration = list(tokenized_batches(sampledata.sentences(64, seed=11), tokenizer,
                                         batch_size=16, max_length=64))
    evaluation = list(tokenized_batches(sampledata.sentences(64, seed=12), tokenizer,
                                        batch_size=32, max_length=64))
    base_ppl = perplexity(model, evaluation)
    results: dict[str, Any] = {"base_ppl": base_ppl, "budget_bits": args.budget,
                               "group_size": args.group_size, "cpu": cpu_model(),
                               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(f"base perplexity {base_ppl:.4f}; budget {args.budget} bits/weight; CPU {cpu_model()}")
    print(f"{'method':6s} {'measure':8s} {'arm':10s} {'ppl':>8s} {'bits/w':>7s} {'bytes':>8s}  choice")
    for method in args.methods.split(","):
        candidates = [Candidate(method, bits, args.group_size, True) for bits in (2, 3, 4, 8)]  # type: ignore[arg-type]
        for measure in args.measures.split(","):
            start = time.perf_counter()
            plan = plan_mixed_precision(model, calibration, candidates, budget_bits=args.budget,
                                        measure=measure)  # type: ignore[arg-type]
            arms = {"mixed": plan, "uniform3": uniform_plan(plan.table, 1),
                    "uniform4": uniform_plan(plan.table, 2)}
            arms |= {f"random{s}": random_plan(plan.table, args.budget, s) for s in range(args.random)}
            figures = {"plan_s": time.perf_counter() - start}
            for name, arm in arms.items():
                figures[name] = measure_arm(model, arm, calibration, evaluation)
                f = figures[name]
                print(f"{method:6s} {measure:8s} {name:10s} {f['ppl']:8.4f} {f['bits']:7.3f} "
                      f"{f['bytes']:8d}  {f['choice']}")
            figures["random_mean_ppl"] = sum(
                figures[f"random{s}"]["ppl"] for s in range(args.random)) / max(args.random, 1)
            print(f"{method:6s} {measure:8s} planning took {figures['plan_s']:.1f} s; "
                  f"random mean ppl {figures['random_mean_ppl']:.4f}")
            results[f"{method}_{measure}"] = figures
    print(json.dumps(results))


if __name__ == "__main__":
    main()
