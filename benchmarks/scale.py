"""Real model sizes: one streamed stage on Llama-shaped models of 1B and 8B parameters.

Each model is built from its config with random bf16 weights, written tensor by tensor
into safetensors shards (no download, never whole in memory) under `.cache/scale/`
(reused by later runs). The stage runs in a fresh subprocess through the library's
stage executor (`compression/streaming.py: stream_stage`, what `squeeze run` uses for
block-wise steps); this process samples the resident memory of the whole process tree
every 0.1 s (the benchmark's own process, which never imports torch, is not counted). With `--generate`, another fresh process loads the packed result
(`load_compressed(runtime="packed")`) and generates 8 tokens, its peak measured too.

Models: 1b (TinyLlama's shape: hidden 2048, MLP 5632, 22 blocks, 32 heads / 4 KV heads),
8b (Llama-3-8B's shape: hidden 4096, MLP 14336, 32 blocks, 32 heads / 8 KV heads);
vocabulary 32000 for both.

Usage: python benchmarks/scale.py --model 1b --method gptq|gptq-sequential|rtn [--samples 128] [--length 256]
       [--generate] [--keep-output] [--resume]
Last line: one JSON object {"models": [{"model", "params", "method", "samples", "length",
"peak_rss_mb", "seconds", "block_seconds", "model_gb_on_disk", "generate": {...}}]}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, dict[str, int]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2},  # a quick check of the script
}
VOCAB = 32000
SHARD_BYTES = 2 * 1024**3  # about 2 GB per input shard, as hub checkpoints are split
METHODS = {"rtn": {"kind": "rtn", "bits": 4, "group_size": 128},
           "gptq": {"kind": "gptq", "bits": 4, "group_size": 128},
           # true-sequential: one calibration forward per block, every batch's alive at once
           "gptq-sequential": {"kind": "gptq", "bits": 4, "group_size": 128, "sequential": True}}


def build(folder: Path, shape: dict[str, int]) -> None:
    """A random bf16 Llama of `shape`, written shard by shard (peak: one shard)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from squeezeflow.compression.models import skeleton
    from squeezeflow.compression.shards import INDEX_FILE, shard_name
    from squeezeflow.testing import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer(vocab_size=512)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    names = [(name, tuple(t.shape)) for name, t in skeleton(config, "causal-lm").state_dict().items()]
    generator = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in names:
        nbytes = 2 * int(torch.Size(dims).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += nbytes
    weight_map = {}
    for index, group in enumerate(groups):
        tensors = {}
        for name, dims in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16)
        file = shard_name(index, len(groups))
        save_file(tensors, str(partial / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        del tensors
        print(f"  built shard {index + 1}/{len(groups)}", flush=True)
    total = sum(2 * int(torch.Size(dims).numel()) for _, dims in names)
    (partial / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)


def calibration_texts(tokenizer: Any, samples: int, length: int) -> list[str]:
    """`samples` texts of at least `length` tokens each, from generated sentences."""
    from squeezeflow import sampledata

    texts = []
    sentences = iter(sampledata.sentences(samples * length, seed=7))
    for _ in range(samples):
        text = ""
        while len(tokenizer(text)["input_ids"]) < length:
            text += next(sentences) + " "
        texts.append(text)
    return texts


def run_stage(folder: str, output: str, method: str, samples: int, length: int, batch: int) -> None:
    """In this (fresh) process: the streamed stage; prints its per-block times as JSON."""
    import torch

    from squeezeflow.compression.catalog import CATALOG
    from squeezeflow.compression.data import tokenized_batches
    from squeezeflow.compression.models import load_tokenizer
    from squeezeflow.compression.streaming import stream_stage

    torch.manual_seed(0)
    tokenizer = load_tokenizer(Path(folder))
    texts = calibration_texts(tokenizer, samples, length) if method != "rtn" else []
    batches = list(tokenized_batches(texts, tokenizer, batch_size=batch, max_length=length))
    config = CATALOG.entry(METHODS[method]["kind"]).config_cls(**METHODS[method])
    marks = [time.perf_counter()]

    def tick(message: str) -> None:
        marks.append(time.perf_counter())
        print(f"  {message} ({marks[-1] - marks[-2]:.1f} s)", flush=True)

    stream_stage(folder, [CATALOG.build(config)], batches, output, work=output + ".work",
                 name=method, progress=tick)
    blocks = [round(b - a, 2) for a, b in zip(marks, marks[1:], strict=False)]
    print(json.dumps({"block_seconds": blocks, "seconds": time.perf_counter() - marks[0]}))


def run_generate(output: str) -> None:
    """In this (fresh) process: load the packed result and generate 8 tokens."""
    import torch

    from squeezeflow.compression.artifact import load_compressed

    start = time.perf_counter()
    loaded = load_compressed(output, runtime="packed")
    loaded_s = time.perf_counter() - start
    batch = loaded.tokenizer(["The robot repaired the garden"], return_tensors="pt")
    with torch.no_grad():
        tokens = loaded.model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = tokens.shape[1] - batch["input_ids"].shape[1]
    print(json.dumps({"new_tokens": int(new), "load_seconds": loaded_s,
                      "generate_seconds": time.perf_counter() - start - loaded_s}))


def measured(command: list[str]) -> tuple[dict[str, Any], float, float]:
    """Run `command`; its last JSON line, the peak RSS (MB) of its process tree, seconds."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        print(line, end="", flush=True)
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed with exit code {code}")
    return json.loads(lines[-1]), peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--method", choices=sorted(METHODS), default="gptq")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--generate", action="store_true", help="load the result, generate 8 tokens")
    parser.add_argument("--keep-output", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stage killed earlier at the block it reached (figures: this run's part)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "scale")
    parser.add_argument("--child", choices=["build", "stage", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        build(Path(args.folder), SHAPES[args.model])
        return
    if args.child == "stage":
        run_stage(args.folder, args.output, args.method, args.samples, args.length, args.batch)
        return
    if args.child == "generate":
        run_generate(args.output)
        return

    # This process stays light (no torch): the figures are those of the child's tree.
    folder = args.cache / f"llama-{args.model}"
    output = args.cache / f"llama-{args.model}-{args.method}"
    script = [sys.executable, str(Path(__file__).resolve())]
    common = ["--model", args.model, "--method", args.method, "--samples", str(args.samples),
              "--length", str(args.length), "--batch", str(args.batch),
              "--folder", str(folder), "--output", str(output)]
    if not folder.exists():
        print(f"building {folder} (random bf16 weights)", flush=True)
        subprocess.run([*script, "--child", "build", *common], check=True, cwd=ROOT)
    shutil.rmtree(output, ignore_errors=True)
    if not args.resume:
        shutil.rmtree(f"{output}.work", ignore_errors=True)
    params = sum(math.prod(entry["shape"]) for shard in folder.glob("*.safetensors")
                 for entry in _header(shard).values())
    print(f"{args.method} on {args.model} ({params / 1e9:.2f}B parameters), "
          f"{args.samples} x {args.length} calibration tokens", flush=True)
    stage, peak, seconds = measured([*script, "--child", "stage", *common])
    row: dict[str, Any] = {
        "model": args.model, "params": params, "method": args.method, "samples": args.samples,
        "length": args.length, "peak_rss_mb": round(peak), "seconds": round(seconds, 1),
        "block_seconds": stage["block_seconds"],
        "model_gb_on_disk": round(_size(folder) / 1e9, 2),
        "output_gb_on_disk": round(_size(output) / 1e9, 2),
        "cpu": _cpu(),
    }
    if args.generate:
        generated, generate_peak, _ = measured([*script, "--child", "generate", *common])
        row["generate"] = {**generated, "peak_rss_mb": round(generate_peak)}
    if not args.keep_output:
        shutil.rmtree(output, ignore_errors=True)
    print()
    print(f"{'model':6} {'params':>8} {'method':6} {'peak RSS MB':>12} {'seconds':>8} "
          f"{'s/block':>8} {'GB on disk':>10}")
    blocks = row["block_seconds"]
    print(f"{args.model:6} {params / 1e9:7.2f}B {args.method:6} {row['peak_rss_mb']:>12} "
          f"{row['seconds']:>8} {sum(blocks) / max(len(blocks), 1):>8.1f} {row['model_gb_on_disk']:>10}")
    if "generate" in row:
        g = row["generate"]
        print(f"packed load + generate: {g['new_tokens']} tokens, load {g['load_seconds']:.1f} s, "
              f"generate {g['generate_seconds']:.1f} s, peak RSS {g['peak_rss_mb']} MB")
    print(json.dumps({"models": [row]}))


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header, read without torch."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header: dict[str, Any] = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _cpu() -> str:
    """The CPU model and torch's capability level on it (read in a child: torch stays out)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    capability = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.strip()
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({capability})"


if __name__ == "__main__":
    main()
