"""End-to-end greedy decoding: tokens/s of fp32 vs int8 vs int4 packed, side by side.

A Llama-architecture causal LM of ~134M parameters built from a config (random
weights: speed does not depend on their values): hidden 768, 12 layers, MLP 2048,
vocabulary 32000. The block Linears are quantized by the `rtn` step (int8 per
channel; int4 with groups of 128) and swapped for packed QuantLinear layers, as
`squeezeflow.load_compressed` does; embeddings and lm_head stay fp32 (the steps'
default `ignore`). Each repeat generates NEW_TOKENS tokens after a PROMPT_TOKENS
prompt at batch 1 with the KV cache, the three models interleaved; tokens/s is
new tokens over the median wall time (prefill included).
Last line: one JSON object {"fp32_tps", "int8_tps", "int4_tps"}.
Usage: python benchmarks/decode.py [--repeats N] [--new-tokens N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from squeezeflow.compression.catalog import CATALOG
from squeezeflow.compression.packed import to_packed_runtime
from squeezeflow.compression.runners import run_stage_steps
from squeezeflow.settings import apply_defaults, quiet_progress_bars

PROMPT_TOKENS = 16  # a short prompt: this measures decoding, not prefill


def build_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def quantized(
    model: LlamaForCausalLM, bits: int, group_size: int | None, prompt: torch.Tensor
) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """The packed model, and the logits of the same quantized weights run dense in fp32."""
    copy_ = copy.deepcopy(model)
    step = CATALOG.build(CATALOG.parse({"kind": "rtn", "bits": bits, "group_size": group_size}))
    run_stage_steps(copy_, [step])
    with torch.inference_mode():
        dense_logits = copy_(prompt).logits
    formats = set(to_packed_runtime(copy_).values())
    expected = {8: "int8", 4: "int4"}[bits]
    if formats != {expected}:
        raise RuntimeError(f"expected every block Linear on the {expected} kernel, got {formats}")
    return copy_, dense_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    apply_defaults()
    quiet_progress_bars()
    torch.set_num_threads(args.threads)

    fp32 = build_model()
    parameters = sum(p.numel() for p in fp32.parameters())
    prompt = torch.randint(2, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    int8, int8_dense = quantized(fp32, 8, None, prompt)
    int4, int4_dense = quantized(fp32, 4, 128, prompt)
    models = {"fp32": fp32, "int8": int8, "int4": int4}

    def generate(model: LlamaForCausalLM) -> torch.Tensor:
        out: torch.Tensor = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False,
        )
        return out

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            generate(model)
        # checks on the prompt's logits (random weights make greedy tokens meaningless):
        # quantization error vs fp32, and kernel error vs the same weights run dense
        logits = {name: model(prompt).logits for name, model in models.items()}
        fp32_dense = {"fp32": logits["fp32"], "int8": int8_dense, "int4": int4_dense}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                generate(model)
                times[name].append(time.perf_counter() - start)
    tps = {name: args.new_tokens / statistics.median(values) for name, values in times.items()}
    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    error = {name: relative(logits[name], logits["fp32"]) for name in models}
    kernel_error = {name: relative(logits[name], fp32_dense[name]) for name in models}
    print(f"Llama {parameters / 1e6:.0f}M parameters, batch 1, {PROMPT_TOKENS}-token prompt, "
          f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<8}{'tokens/s':>10}{'vs fp32':>10}{'logit error vs fp32':>22}"
          f"{'vs same weights dense':>24}")
    for name in models:
        print(f"{name:<8}{tps[name]:>10.1f}{tps[name] / tps['fp32']:>9.2f}x{error[name]:>22.4f}"
              f"{kernel_error[name]:>24.4f}")
    print(json.dumps({f"{name}_tps": round(value, 2) for name, value in tps.items()}))


if __name__ == "__main__":
    main()
