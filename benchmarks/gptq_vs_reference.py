"""Our GPTQ vs GPTQModel vs RTN, same config (4-bit, group 128, symmetric, damp 0.01,
no activation order, true-sequential as GPTQModel's default) and the same calibration
tokens.

- quality: a small Llama trained here for a few minutes on generated sentences;
  held-out perplexity of the base, RTN, our GPTQ and GPTQModel's GPTQ. GPTQModel's
  checkpoint is dequantized into an fp32 model, so all variants run the same fp32
  matmuls and only the quantized weights differ.
- cost: a Llama of >= 100M parameters built from a config (random weights), 128
  calibration sequences of 256 tokens; each quantizer runs in a fresh process that
  reports its quantization wall time (load and save excluded) and its peak RSS
  (load included).

Usage: python benchmarks/gptq_vs_reference.py [--quick] [--threads N] [--precision bf16|fp32]
       [--no-sequential]
(--quick: tiny cost model, smoke test; --precision: our GPTQ's calibration_precision;
both GPTQs run true-sequential, GPTQModel's default, unless --no-sequential: then neither)
Last line: one JSON object with base_ppl, rtn_ppl, ours_ppl, gptqmodel_ppl, ours_s,
gptqmodel_s, ours_peak_mb, gptqmodel_peak_mb, sequential.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder is first on sys.path, and its kernels.py would shadow
# the `kernels` package that transformers probes for at import time.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from squeezeflow import sampledata  # noqa: E402
from squeezeflow.compression.quantization.gptq.step import GPTQConfig, GPTQStep  # noqa: E402
from squeezeflow.compression.quantization.rtn.step import RTNConfig, RTNStep  # noqa: E402
from squeezeflow.compression.runners import run_stage_steps  # noqa: E402
from squeezeflow.evaluation.perplexity import perplexity  # noqa: E402
from squeezeflow.settings import apply_defaults, quiet_progress_bars  # noqa: E402
from squeezeflow.testing import save_model, tiny_llama, train_causal_lm  # noqa: E402

CONFIG = GPTQConfig(bits=4, group_size=128, symmetric=True, damp=0.01, act_order=False)
RTN = RTNConfig(bits=4, group_size=128, symmetric=True)
CALIBRATION_BATCH = 8  # sequences per forward pass, for every quantizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small cost model (smoke test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of every quantizer (GPTQModel: at least 2 workers)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="our GPTQ's calibration_precision (default: its default, bf16)")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                        help="both GPTQs quantize each group of Linears before the next group's "
                             "inputs are taken (default: on, GPTQModel's default true_sequential; "
                             "--no-sequential: neither does)")
    parser.add_argument("--worker", choices=["ours", "gptqmodel", "rtn"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CONFIG
    CONFIG = CONFIG.model_copy(update={"calibration_precision": args.precision,
                                       "sequential": args.sequential})
    apply_defaults()
    quiet_progress_bars()
    # GPTQModel's worker pool needs at least 2 (its model loader takes 2 of them)
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, args.threads))
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(cost_worker(args.worker, args.model, args.calibration)))
        return

    with tempfile.TemporaryDirectory() as scratch:
        quality = quality_run(Path(scratch), quick=args.quick)
        cost = {name: cost_run(name, Path(scratch), quick=args.quick, threads=args.threads,
                               precision=args.precision, sequential=args.sequential)
                for name in ("rtn", "ours", "gptqmodel")}

    print(f"quality: held-out perplexity of a {quality['parameters'] / 1e6:.1f}M-parameter Llama "
          f"trained here; calibration {quality['calibration']}")
    print(f"{'':>12} {'perplexity':>11}")
    for name in ("base", "rtn", "ours", "gptqmodel"):
        print(f"{name:>12} {quality[f'{name}_ppl']:>11.4f}")
    shape = cost["ours"]["shape"]
    print(f"\ncost: Llama {shape}, calibration {cost['ours']['calibration']}, "
          f"{args.threads} thread(s) each; ours with calibration_precision {args.precision}; "
          f"true-sequential: {'both' if args.sequential else 'neither'}")
    print(f"{'':>12} {'seconds':>9} {'peak MB':>9}")
    for name in ("rtn", "ours", "gptqmodel"):
        print(f"{name:>12} {cost[name]['seconds']:>9.1f} {cost[name]['peak_mb']:>9.0f}")
    print(f"speed-up ours vs GPTQModel: {cost['gptqmodel']['seconds'] / cost['ours']['seconds']:.2f}x")
    print(json.dumps({
        "base_ppl": round(quality["base_ppl"], 4),
        "rtn_ppl": round(quality["rtn_ppl"], 4),
        "ours_ppl": round(quality["ours_ppl"], 4),
        "gptqmodel_ppl": round(quality["gptqmodel_ppl"], 4),
        "ours_s": round(cost["ours"]["seconds"], 2),
        "gptqmodel_s": round(cost["gptqmodel"]["seconds"], 2),
        "ours_peak_mb": round(cost["ours"]["peak_mb"], 1),
        "gptqmodel_peak_mb": round(cost["gptqmodel"]["peak_mb"], 1),
        "sequential": args.sequential,
    }))


# --- quality ---------------------------------------------------------------------


def packed_sequences(tokenizer, seed: int, count: int, length: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`count` windows of `length` tokens cut from concatenated generated sentences."""
    texts = sampledata.sentences(count * length // 4, seed=seed)  # >= 4 tokens per sentence
    ids = torch.cat([torch.tensor(tokenizer(text)["input_ids"]) for text in texts])
    if ids.numel() < count * length:
        raise ValueError("not enough generated text for the calibration windows")
    return ids[: count * length].reshape(count, length)  # (count, length)


def as_batches(sequences: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
            for chunk in sequences.split(batch_size)]


def quality_run(scratch: Path, quick: bool) -> dict[str, float | str]:
    if quick:
        model, tokenizer = tiny_llama(hidden=128, layers=2, heads=4, intermediate=256, seed=0)
        train_causal_lm(model, tokenizer, steps=30, batch_size=16)
    else:  # 256 wide: g128 makes two groups per row. 60 steps leave it unsure enough that
        # 4-bit rounding shows in perplexity; after 200 steps RTN measured below base (noise)
        model, tokenizer = tiny_llama(hidden=256, layers=2, heads=4, intermediate=512, seed=0)
        train_causal_lm(model, tokenizer, steps=60, batch_size=16)
    base_dir = save_model(model, tokenizer, scratch / "quality-base")
    calibration = as_batches(packed_sequences(tokenizer, seed=11, count=128, length=64),
                             CALIBRATION_BATCH)
    held_out = as_batches(packed_sequences(tokenizer, seed=12, count=128, length=64), 16)

    result: dict[str, float | str] = {
        "parameters": float(sum(p.numel() for p in model.parameters())),
        "calibration": "128 x 64 tokens",
        "base_ppl": perplexity(model, held_out),
    }
    for name, step in (("rtn", RTNStep(RTN)), ("ours", GPTQStep(CONFIG))):
        candidate = copy.deepcopy(model)
        run_stage_steps(candidate, [step], calibration)
        result[f"{name}_ppl"] = perplexity(candidate, held_out)

    from squeezeflow.compression.quantization.gptq.gptqmodel_backend import load_and_quantize

    quantized = load_and_quantize(CONFIG, base_dir, calibration, batch_size=CALIBRATION_BATCH)
    quantized.save(str(scratch / "quality-gptqmodel"))
    result["gptqmodel_ppl"] = perplexity(dequantized_gptq(scratch / "quality-gptqmodel", model),
                                         held_out)
    return result


def dequantized_gptq(folder: Path, base: torch.nn.Module) -> torch.nn.Module:
    """The base model with every Linear replaced by the GPTQ checkpoint's dequantized weight."""
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dense = copy.deepcopy(base)
    modules = dict(dense.named_modules())
    replaced = 0
    for name, module in quantized.named_modules():
        if hasattr(module, "dequantize_weight") and hasattr(module, "qweight"):
            W_hat = module.dequantize_weight().T.to(torch.float32)  # (in, out) -> (out, in)
            modules[name].weight.data.copy_(W_hat)
            replaced += 1
    if replaced == 0:
        raise RuntimeError(f"{folder}: no quantized layers found")
    return dense


# --- cost ------------------------------------------------------------------------


def cost_model_config(quick: bool) -> LlamaConfig:
    if quick:
        return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512, tie_word_embeddings=False)
    # 134M parameters: 12 blocks of 7.1M plus 2 x 24.6M for embeddings and lm_head
    return LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       max_position_embeddings=512, tie_word_embeddings=False)


def cost_run(name: str, scratch: Path, quick: bool, threads: int, precision: str,
             sequential: bool) -> dict[str, object]:
    model_dir = scratch / "cost-model"
    calibration_file = scratch / "cost-calibration.pt"
    if not model_dir.exists():
        config = cost_model_config(quick)
        config.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        _, tokenizer = tiny_llama()  # any tokenizer: calibration is given as token ids
        save_model(model, tokenizer, model_dir)
        count, length = (16, 64) if quick else (128, 256)
        ids = torch.randint(0, config.vocab_size, (count, length),
                            generator=torch.Generator().manual_seed(1))
        torch.save(ids, calibration_file)
        del model
    command = [sys.executable, __file__, "--worker", name, "--model", str(model_dir),
               "--calibration", str(calibration_file), "--threads", str(threads),
               "--precision", precision, "--sequential" if sequential else "--no-sequential"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def cost_worker(name: str, model_dir: Path, calibration_file: Path) -> dict[str, object]:
    """Runs in a fresh process: quantization seconds and the process's peak RSS."""
    ids = torch.load(calibration_file)  # (count, length)
    calibration = as_batches(ids, CALIBRATION_BATCH)
    if name == "gptqmodel":
        from squeezeflow.compression.quantization.gptq import gptqmodel_backend

        gptqmodel = gptqmodel_backend.require_gptqmodel()
        model = gptqmodel.GPTQModel.load(
            str(model_dir), gptqmodel_backend.gptqmodel_quantize_config(CONFIG), device="cpu",
            dtype=torch.float32,
        )
        samples = gptqmodel_backend.calibration_samples(calibration)
        start = time.perf_counter()
        model.quantize(samples, batch_size=CALIBRATION_BATCH)
        seconds = time.perf_counter() - start
        parameters = sum(p.numel() for p in model.model.parameters())
    else:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        parameters = sum(p.numel() for p in model.parameters())
        step = GPTQStep(CONFIG) if name == "ours" else RTNStep(RTN)
        start = time.perf_counter()
        run_stage_steps(model, [step], calibration)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": peak_rss_mb(),
        "shape": f"{parameters / 1e6:.0f}M parameters (as loaded)",
        "calibration": f"{ids.shape[0]} x {ids.shape[1]} tokens",
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss survives
    exec, so a worker would report its (large) parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


if __name__ == "__main__":
    main()
