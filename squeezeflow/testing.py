"""Tiny models and data made on the spot, for tests and benchmarks (no hub access).

- `word_tokenizer`: a word-level tokenizer over the sample-data vocabulary;
- `tiny_llama` / `tiny_bert`: models built from configs, optionally trained for a
  few seconds on generated sentences so that compression error is measurable;
- `save_model`: write a model + tokenizer as a standard HF folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from squeezeflow import sampledata

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def vocabulary() -> list[str]:
    words: set[str] = set()
    for group in (sampledata.SUBJECTS, sampledata.VERBS, sampledata.OBJECTS, sampledata.PLACES,
                  sampledata.REASONS, sampledata.TEMPLATES):
        for phrase in group:
            words.update(re.findall(r"\w+|[^\w\s]", phrase.replace("{", " ").replace("}", " ")))
    words |= {w.capitalize() for w in words}
    return SPECIALS + sorted(words)


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; encoders get [CLS] ... [SEP], causal LMs get <s> ...."""
    vocab = {word: index for index, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    if kind == "encoder":
        backend.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    backend.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
        eos_token="</s>",
    )


def tiny_llama(
    hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128, seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,  # default: word_tokenizer("causal-lm")
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = tokenizer or word_tokenizer("causal-lm")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval(), tokenizer


def tiny_bert(
    hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128, seed: int = 0
) -> tuple[BertModel, PreTrainedTokenizerFast]:
    tokenizer = word_tokenizer("encoder")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["BertModel"]
    return BertModel(config, add_pooling_layer=False).eval(), tokenizer


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 3e-3,  # high for a tiny model; converges in ~150 steps on sample data
    seed: int = 0,
) -> float:
    """Train on generated sentences; returns the final training loss."""
    texts = sampledata.sentences(steps * batch_size, seed=seed + 100)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch = tokenizer(
            texts[step * batch_size : (step + 1) * batch_size], padding=True, return_tensors="pt"
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_texts(path: Path, count: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sampledata.sentences(count, seed=seed)) + "\n")
    return path


def tiny_mixtral(
    hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 64, experts: int = 4,
    top_k: int = 2, seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny Mixtral (mixture-of-experts causal LM) built from its config."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = word_tokenizer("causal-lm")
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["MixtralForCausalLM"]
    return MixtralForCausalLM(config).eval(), tokenizer


def add_outlier_features(model: PreTrainedModel, count: int = 4, factor: float = 8.0, seed: int = 0) -> None:
    """Function-preserving rescaling that gives a Llama-style model a few large input features.

    Trained LLMs have a few hidden channels with very large activations (Dettmers et al.
    2022, LLM.int8()); a tiny model trained for seconds does not. Multiplying an RMSNorm's
    weight by s and dividing the columns of the Linears it feeds by s leaves every output
    unchanged (up to rounding), but makes those columns' weights small while their inputs
    are large: the case where |W| alone is the wrong pruning criterion.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for norm, linears in (
                (layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                s = torch.ones(norm.weight.numel())
                s[torch.randperm(s.numel(), generator=generator)[:count]] = factor
                norm.weight.mul_(s)
                for linear in linears:
                    linear.weight.div_(s)


def byte_bpe_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE trained on sample sentences: a tokenizer llama.cpp
    reproduces (GGUF `gpt2` model, `gpt-2` pre-tokenizer), unlike `word_tokenizer`."""
    from tokenizers import decoders, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    backend.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    trainer = trainers.BpeTrainer(  # type: ignore[call-arg]
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(sampledata.sentences(2000, seed=seed), trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# CPU-only, no BLAS/OpenMP, library only: what the GGUF checks load (about 10 minutes on 2 cores)
LLAMA_CPP_CMAKE_ARGS = (
    "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)


def llama_cpp_folder(repo: Path) -> Path:
    """Where llama-cpp-python is built for this CPU: `.cache/llamacpp-<flags hash>`.

    llama.cpp compiles for the building CPU's instruction set (GGML_NATIVE), so a build
    made on a machine with AVX512 or AMX dies with SIGILL on one without: each CPU
    (its /proc/cpuinfo flags) gets its own folder, and a folder built elsewhere is not used.
    """
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "unknown")
    digest = hashlib.sha256(" ".join(sorted(flags.split(":", 1)[-1].split())).encode()).hexdigest()
    return repo / ".cache" / f"llamacpp-{digest[:12]}"
