"""Memory preflight vs measured peak RSS of one stage, as `tasks/stages.py` runs it.

For each Llama shape (random weights, safetensors, built from a config: no download)
and each method, a fresh subprocess imports the stage task's modules (the same
runtime a `squeeze run` stage has), loads the model, tokenizes the calibration text,
runs the stage (`stage_baseline`, `run_stage_steps`, `require_change`) and saves it
with `save_compressed`; its peak RSS (`ru_maxrss`) is compared with
`compression/preflight.py`'s estimate for the same stage from the folder's headers.
The rtn output is then evaluated against the base (`evaluation/suite.py: evaluate`,
quality + latency + size) in another fresh process, against the evaluation estimate.

Usage: python benchmarks/preflight_accuracy.py [--samples 32] [--length 128] [--batch 8]
       [--models 512x8,768x8] [--methods rtn,gptq,gptq-sequential] [--dtype fp32|bf16]
       [--eval-samples 64] [--eval-batch 16]
Last line: one JSON object {"rows": [{"model", "dtype", "params", "method", "measured_mb",
"estimated_mb", "ratio"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from squeezeflow.compression.preflight import DataSize

METHODS = {"rtn": {"kind": "rtn", "bits": 4, "group_size": 128},
           "gptq": {"kind": "gptq", "bits": 4, "group_size": 128},
           # true-sequential: every batch's block forward alive at once
           "gptq-sequential": {"kind": "gptq", "bits": 4, "group_size": 128, "sequential": True}}
VOCAB = 32000  # Llama's vocabulary: the embeddings and head weigh as in a real model


def build(folder: Path, hidden: int, layers: int, dtype: str) -> None:
    """A random Llama of this shape with the word tokenizer, saved as safetensors in
    `dtype` (bf16: as hub checkpoints are stored; the stage converts it to fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from squeezeflow.testing import word_tokenizer

    tokenizer = word_tokenizer("causal-lm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
                                ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_stage(folder: str, method: str, samples: int, length: int, batch: int) -> None:
    """In this (fresh) process: one stage as `_compute_stage` runs it (the library's
    stage executor: streamed block by block where the steps allow it), saved beside the
    model; prints peak RSS MB."""
    import resource
    import shutil

    import torch

    import squeezeflow.tasks.stages  # noqa: F401 (the runtime a stage runs in)
    from squeezeflow import sampledata
    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.data import tokenized_batches
    from squeezeflow.compression.executor import compress_stage
    from squeezeflow.compression.models import load_tokenizer

    torch.set_num_threads(2)
    config = CATALOG.parse(METHODS[method])
    texts = sampledata.sentences(samples)
    batches = list(tokenized_batches(texts, load_tokenizer(Path(folder)), batch_size=batch,
                                     max_length=length))
    output = _output(folder, method)
    shutil.rmtree(output, ignore_errors=True)
    compress_stage(folder, [config], output, calibration=batches, work=f"{output}.work", name=method)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # kB on Linux


def run_evaluation(folder: str, method: str, samples: int, length: int, batch: int) -> None:
    """In this (fresh) process: `evaluate` base vs the stage's output as the flow's
    evaluation task runs it (quality, latency, size; the memory suite runs in children
    of its own); prints peak RSS MB."""
    import resource

    import torch

    import squeezeflow.tasks.stages  # noqa: F401 (the runtime evaluation runs in)
    from squeezeflow import sampledata
    from squeezeflow.evaluation.suite import EvaluationSettings, LatencySettings, evaluate

    torch.set_num_threads(2)
    settings = EvaluationSettings(
        suites=("quality", "latency", "size"), batch_size=batch, max_length=length,
        latency=LatencySettings(warmup=1, repeats=2, decode_tokens=4),  # memory, not speed
    )
    evaluate(Path(folder), _output(folder, method), sampledata.sentences(samples), settings)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _output(folder: str, method: str) -> Path:
    return Path(f"{folder}-{method}")


def _peak_mb(mode: str, folder: Path, method: str, args: argparse.Namespace, data: DataSize) -> float:
    """Peak RSS of one fresh process running `mode` (stage or evaluation)."""
    return float(subprocess.run(
        [sys.executable, __file__, f"--{mode}", str(folder), method,
         "--samples", str(data.num_samples), "--length", str(data.max_length),
         "--batch", str(data.batch_size)],
        check=True, capture_output=True, text=True,
    ).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="512x8,768x8")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored weights")
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=16)  # the recipe default
    parser.add_argument("--stage", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--evaluation", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage or args.evaluation:
        run = run_stage if args.stage else run_evaluation
        run(*(args.stage or args.evaluation), args.samples, args.length, args.batch)
        return
    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.preflight import ModelShape, estimate_evaluation, estimate_stage

    calibration = DataSize(args.samples, args.length, args.batch)
    evaluation = DataSize(args.eval_samples, 128, args.eval_batch)
    rows = []
    print(f"{'model':>11} {'params':>8} {'phase':>10} {'measured MB':>12} {'estimate MB':>12} "
          f"{'ratio':>6}  estimate")
    with tempfile.TemporaryDirectory() as root:
        for spec in args.models.split(","):
            hidden, layers = (int(x) for x in spec.split("x"))
            folder = Path(root) / spec
            build(folder, hidden, layers, args.dtype)
            shape = ModelShape.from_folder(folder)
            for method in args.methods.split(","):
                config = CATALOG.parse(METHODS[method])
                phases = [("stage", calibration, estimate_stage(method, [config], shape, calibration, None))]
                if method == "rtn":  # evaluation of the rtn candidate: base fp32 + packed candidate
                    phases.append(("evaluation", evaluation, estimate_evaluation(shape, [[config]], evaluation)))
                for mode, data, estimate in phases:
                    measured = _peak_mb(mode, folder, method, args, data)
                    row = {"model": spec, "dtype": args.dtype, "params": shape.parameters,
                           "method": method if mode == "stage" else f"eval({method})",
                           "measured_mb": round(measured, 1),
                           "estimated_mb": round(estimate.total / 2**20, 1),
                           "ratio": round(estimate.total / 2**20 / measured, 3)}
                    rows.append(row)
                    print(f"{spec + ' ' + args.dtype:>11} {shape.parameters / 1e6:>7.1f}M "
                          f"{row['method']:>10} {measured:>12.1f} {row['estimated_mb']:>12.1f} "
                          f"{row['ratio']:>6.2f}  {estimate.describe()}")
    print(json.dumps({"rows": rows, "calibration": vars(calibration), "evaluation": vars(evaluation)}))


if __name__ == "__main__":
    main()
