"""`gguf`: a packed causal LM (Llama or Qwen2 family) written as one GGUF file for llama.cpp.

What each tensor becomes (`out/model.gguf`):
- integer-grid Linears (`quantized` format) whose grid is one of GGUF's, exactly:
  GGUF's Q4_0 block is W = d * (q - 8), q in 0..15, and Q8_0 is W = d * q, q in
  -128..127, with one fp16 `d` per block of 32 input columns. Our grid is
  W = scale * (code - zero) per (row, group). A layer maps exactly when every block of
  32 columns lies in one group (group size a multiple of 32, g_idx constant per block:
  not act_order's permuted groups), it has no SmoothQuant input scale, and
  code - zero fits the block type: [-8, 7] -> Q4_0 (symmetric 2-4 bits), else
  [-128, 127] -> Q8_0 (8 bits, or asymmetric 4 bits, whose zero point moves the
  offsets past [-8, 7]). fp16 rounding of d: our scales are fp16 values by
  construction (`qweight.SCALE_DTYPE`; the format stores them as fp16), so d = scale
  exactly and d * q equals our dequantized weight bit for bit, in fp32 like ggml.
  The exporter checks this per layer (a scale that fp16 would round makes the layer
  "requantized", not "exact") and checks the written blocks against the format's
  reference weight with `gguf.quants.dequantize`.
- every other stored-format Linear (other formats, inexact grids): requantized from
  the format's reference weight to Q8_0 by `gguf.quants.quantize` (llama.cpp's own
  rounding). Rule: Q8_0 always, because its added error (<= 1/254 of each block's
  largest weight) is small next to any 2-4 bit grid's own error, while requantizing
  onto Q4_0 would roughly double a 4-bit model's rounding error. The relative
  (Frobenius) error it adds is logged and returned per export.
- dense 2-D weights (embeddings, an unquantized head or Linear) as F16: they are most
  of a small quantized model's bytes, and fp16 rounding (relative 2**-11) is far
  below the quantized layers' error; its relative error is measured and returned too.
  1-D tensors (RMSNorm weights, biases) as F32: llama.cpp requires norms in F32 and
  they are tiny.

Llama's q/k rows are permuted from Hugging Face's rotary layout (halves) to ggml's
(interleaved pairs), as llama.cpp's convert script does; codes and scales are
permuted by the same row index, so exactness is unaffected. Qwen2 uses NEOX rotary
in llama.cpp: no permutation.

Tokenizers: llama.cpp tokenizes by itself, so only tokenizers it reproduces are
written: byte-level BPE (`gpt2` model; pre-tokenizer `gpt-2`, `qwen2` or `llama-bpe`
recognized from the split regex) and SentencePiece-style ones (`llama` model:
Unigram, or BPE with byte fallback). A word-level tokenizer (our test vocabulary)
has no llama.cpp counterpart: NotExportableError.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from squeezeflow.compression.exports.base import NotExportableError
from squeezeflow.compression.integrity import atomic_write

if TYPE_CHECKING:
    import numpy as np
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
BLOCK = 32  # columns per Q4_0 / Q8_0 block (ggml's QK4_0 = QK8_0 = 32)
Q4_OFFSET = 8  # Q4_0 stores q + 8 in a nibble: offsets -8..7
# Hugging Face `model_type` -> llama.cpp architecture; whether q/k rows are permuted
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
# Hugging Face module suffix -> llama.cpp tensor name (inside `blk.N.`)
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# split regexes of byte-level BPE pre-tokenizers -> llama.cpp's `tokenizer.ggml.pre`
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {GPT2_REGEX: "gpt-2", QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


@dataclass
class Tally:
    """What the export did, for the returned figures."""

    exact: int = 0
    exact_q4_0: int = 0
    exact_q8_0: int = 0
    requantized: int = 0
    requantized_max_rel_error: float = 0.0
    dense_f16: int = 0
    dense_f16_max_rel_error: float = 0.0
    f32: int = 0


def export(source: Path, out: Path) -> dict[str, float]:
    """Write `out/model.gguf` from the packed folder `source`; returns the export's figures."""
    import gguf

    from squeezeflow.compression.artifact import load_compressed
    from squeezeflow.compression.formats import stored_linears

    loaded = load_compressed(source)  # dense runtime: stored values attached to their Linears
    model, config = loaded.model, loaded.model.config
    if config.model_type not in ARCHITECTURES:
        raise NotExportableError(
            f"gguf export supports model types {', '.join(ARCHITECTURES)}; {source} is {config.model_type!r}"
        )
    arch, permute_qk = ARCHITECTURES[config.model_type]
    stored = {linear.owner: linear for linear in stored_linears(model)}
    for linear in stored.values():
        for sharer in linear.sharers:
            stored[sharer] = linear

    writer = gguf.GGUFWriter(path=None, arch=arch)
    _write_architecture(writer, config, arch, source.name)
    _write_tokenizer(writer, source, int(config.vocab_size))
    tally = Tally()
    types: list[int] = []
    for module_name, gguf_name in _tensor_names(model, config):
        module = model.get_submodule(module_name)
        permute = permute_qk and gguf_name.split(".")[-1] in ("attn_q", "attn_k")
        rows = _rotary_rows(config, gguf_name) if permute else None
        for parameter_name in ("weight", "bias"):
            value = getattr(module, parameter_name, None)
            if not isinstance(value, Tensor):
                continue
            name = f"{gguf_name}.{parameter_name}"
            if parameter_name == "weight" and module_name in stored:
                data, qtype = _stored_tensor(name, stored[module_name], rows, tally)
            else:
                data, qtype = _dense_tensor(name, value.detach().float(), rows, tally)
            types.append(int(qtype))
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.add_file_type(_file_type(types))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    target = Path(out) / GGUF_FILE
    with atomic_write(target, "wb") as handle:
        # GGUFWriter opens its path itself: it writes to the temporary file `handle`
        # holds open, which atomic_write renames into place once this block succeeded.
        writer.write_header_to_file(path=Path(handle.name))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    figures = {
        "tensors_exact": float(tally.exact),
        "tensors_exact_q4_0": float(tally.exact_q4_0),
        "tensors_exact_q8_0": float(tally.exact_q8_0),
        "tensors_requantized": float(tally.requantized),
        "requantized_max_rel_error": tally.requantized_max_rel_error,
        "tensors_f16": float(tally.dense_f16),
        "f16_max_rel_error": tally.dense_f16_max_rel_error,
        "tensors_f32": float(tally.f32),
        "gguf_bytes": float(target.stat().st_size),
    }
    log.info("gguf export %s: %s", target, figures)
    return figures


# ----- tensors ----------------------------------------------------------------------


def _tensor_names(model: nn.Module, config: PretrainedConfig) -> list[tuple[str, str]]:
    """(Hugging Face module name, llama.cpp tensor name) in llama.cpp's order."""
    names = [("model.embed_tokens", "token_embd")]
    for index in range(int(config.num_hidden_layers)):
        names += [(f"model.layers.{index}.{suffix}", f"blk.{index}.{name}")
                  for suffix, name in BLOCK_TENSORS.items()]
    names.append(("model.norm", "output_norm"))
    head = model.get_submodule("lm_head")
    if head.weight is not model.get_submodule("model.embed_tokens").weight:
        names.append(("lm_head", "output"))  # tied: llama.cpp reuses token_embd
    return names


def _rotary_rows(config: PretrainedConfig, gguf_name: str) -> Tensor:
    """Row order taking HF's rotary layout to ggml's (convert_hf_to_gguf `LlamaModel.permute`).

    Per head HF holds the first halves of the rotary pairs, then the second halves;
    ggml interleaves them: row (h, i, j) of ggml is row (h, j, i) of HF, i < head_dim/2.
    """
    heads = int(config.num_key_value_heads if gguf_name.endswith("attn_k") else config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    index = torch.arange(heads * head_dim).reshape(heads, 2, head_dim // 2)  # (h, half, i)
    return index.transpose(1, 2).reshape(-1)  # (out,): ggml row r takes HF row index[r]


def _stored_tensor(name: str, linear: Any, rows: Tensor | None, tally: Tally) -> tuple[np.ndarray, Any]:
    """A stored-format weight as GGUF blocks: exact where the grid maps, else requantized."""
    from squeezeflow.compression.formats import FORMATS
    from squeezeflow.compression.formats.integer import IntegerFormat

    reference = linear.format.reference(linear.stored)  # (out, in) fp32: the ground truth
    if rows is not None:
        reference = reference[rows]
    if linear.format is FORMATS.of(IntegerFormat):
        quantized = linear.stored if rows is None else _rows_of(linear.stored, rows)
        exact = _exact_blocks(quantized)
        if exact is not None:
            data, qtype = exact
            _check_exact(name, data, qtype, reference)
            tally.exact += 1
            if qtype.name == "Q4_0":
                tally.exact_q4_0 += 1
            else:
                tally.exact_q8_0 += 1
            return data, qtype
    return _requantized(name, reference, tally)


def _rows_of(quantized: Any, rows: Tensor) -> Any:
    """The integer-grid weight with its output rows (codes, scales, zeros) reordered."""
    from dataclasses import replace

    return replace(quantized, codes=quantized.codes[rows], scale=quantized.scale[rows],
                   zero=quantized.zero[rows])


def _exact_blocks(quantized: Any) -> tuple[np.ndarray, Any] | None:
    """Q4_0 / Q8_0 blocks holding exactly the integer grid's weight, or None if it does not map."""
    import gguf
    import numpy as np

    rows, columns = quantized.shape
    if quantized.input_scale is not None or columns % BLOCK:
        return None
    block_groups = quantized.g_idx.reshape(-1, BLOCK)  # (in/32, 32)
    if not bool((block_groups == block_groups[:, :1]).all()):
        return None  # a block spans two groups (group size 16, act_order's permuted groups)
    scale = quantized.scale[:, block_groups[:, 0]]  # (out, in/32): one d per block
    d = scale.to(torch.float16)
    if not torch.equal(d.to(torch.float32), scale):
        return None  # fp16 would round the scale: not exact
    offsets = quantized.codes.to(torch.int16) - quantized.zero[:, quantized.g_idx].to(torch.int16)  # (out, in)
    d_bytes = d.numpy().view(np.uint8).reshape(rows, -1, 2)  # (out, in/32, 2)
    q = offsets.reshape(rows, -1, BLOCK)  # (out, in/32, 32)
    if int(q.min()) >= -Q4_OFFSET and int(q.max()) < Q4_OFFSET:
        nibbles = (q + Q4_OFFSET).to(torch.uint8)  # (out, in/32, 32)
        # ggml packs element j in the low nibble and element j + 16 in the high one
        packed = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)  # (out, in/32, 16)
        blocks = np.concatenate([d_bytes, packed.numpy()], axis=-1)  # (out, in/32, 18)
        return blocks.reshape(rows, -1), gguf.GGMLQuantizationType.Q4_0
    if int(q.min()) >= -128 and int(q.max()) <= 127:
        values = q.to(torch.int8).numpy().view(np.uint8)  # (out, in/32, 32)
        blocks = np.concatenate([d_bytes, values], axis=-1)  # (out, in/32, 34)
        return blocks.reshape(rows, -1), gguf.GGMLQuantizationType.Q8_0
    return None


def _check_exact(name: str, data: np.ndarray, qtype: Any, reference: Tensor) -> None:
    """The written blocks decode (by gguf's own dequantizer) to the reference weight, bit for bit."""
    import gguf

    decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype))  # (out, in)
    if not torch.equal(decoded, reference):
        difference = float((decoded - reference).abs().max())
        raise RuntimeError(f"gguf export of {name}: {qtype.name} blocks differ from the stored "
                           f"weight by up to {difference:.3g} (an exporter bug)")


def _requantized(name: str, reference: Tensor, tally: Tally) -> tuple[np.ndarray, Any]:
    """Q8_0 by llama.cpp's rounding; records the relative error it adds."""
    import gguf

    if reference.shape[1] % BLOCK:
        return _dense_tensor(name, reference, None, tally)  # no block type fits: F16
    qtype = gguf.GGMLQuantizationType.Q8_0
    data = gguf.quants.quantize(reference.numpy(), qtype)
    decoded = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    error = _relative_error(decoded, reference)
    log.info("gguf: %s requantized to Q8_0, relative error %.2e", name, error)
    tally.requantized += 1
    tally.requantized_max_rel_error = max(tally.requantized_max_rel_error, error)
    return data, qtype


def _dense_tensor(name: str, value: Tensor, rows: Tensor | None, tally: Tally) -> tuple[np.ndarray, Any]:
    """2-D as F16 (error recorded), 1-D as F32."""
    import gguf

    if rows is not None:
        value = value[rows]
    if value.dim() == 1:
        tally.f32 += 1
        return value.numpy(), gguf.GGMLQuantizationType.F32
    half = value.to(torch.float16)
    tally.dense_f16 += 1
    tally.dense_f16_max_rel_error = max(tally.dense_f16_max_rel_error,
                                        _relative_error(half.float(), value))
    return half.numpy(), gguf.GGMLQuantizationType.F16


def _relative_error(approximation: Tensor, exact: Tensor) -> float:
    return float((approximation - exact).norm() / exact.norm().clamp(min=1e-30))


def _file_type(types: list[int]) -> int:
    """llama.cpp's `general.file_type`: the type of most quantized tensors (else F16)."""
    import gguf

    counts = {t: types.count(t) for t in set(types)}
    q4, q8 = counts.get(int(gguf.GGMLQuantizationType.Q4_0), 0), counts.get(int(gguf.GGMLQuantizationType.Q8_0), 0)
    if q4 == q8 == 0:
        return int(gguf.LlamaFileType.MOSTLY_F16)
    return int(gguf.LlamaFileType.MOSTLY_Q4_0 if q4 >= q8 else gguf.LlamaFileType.MOSTLY_Q8_0)


# ----- metadata ---------------------------------------------------------------------


def _write_architecture(writer: Any, config: PretrainedConfig, arch: str, name: str) -> None:
    """The `{arch}.*` keys llama.cpp reads for Llama / Qwen2 models."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    legacy_scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (legacy_scaling and legacy_scaling.get("rope_type", "default") != "default"):
        raise NotExportableError(f"rope type {rope_type!r}: only default rotary embeddings are exported")
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))


def _write_tokenizer(writer: Any, source: Path, vocab_size: int) -> None:
    """`tokenizer.ggml.*`: model, pre-tokenizer, tokens, scores, types, merges, special ids."""
    import gguf

    path = source / "tokenizer.json"
    if not path.is_file():
        raise NotExportableError(f"{source} has no tokenizer.json (a fast tokenizer is needed)")
    spec = json.loads(path.read_text())
    model = spec["model"]
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    if model["type"] == "Unigram":
        pieces = [(piece, float(score)) for piece, score in model["vocab"]]
    else:
        vocab: dict[str, int] = dict(model.get("vocab", {}))
        by_id = {index: token for token, index in vocab.items()}
        by_id.update({index: token["content"] for index, token in added.items()})
        pieces = [(by_id.get(i, f"[PAD{i}]"), -float(i)) for i in range(max(by_id) + 1)]
    if len(pieces) > vocab_size:
        raise NotExportableError(f"tokenizer has {len(pieces)} tokens, the model's vocab_size is {vocab_size}")
    defined = len(pieces)  # ids past it only pad the embedding to vocab_size
    pieces += [(f"[PAD{i}]", -float(i)) for i in range(defined, vocab_size)]

    byte_level = _has(spec.get("pre_tokenizer"), "ByteLevel") or _has(spec.get("decoder"), "ByteLevel")
    if model["type"] == "BPE" and byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec))
        merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
        writer.add_token_merges(merges)
    elif model["type"] == "Unigram" or (model["type"] == "BPE" and model.get("byte_fallback")):
        writer.add_tokenizer_model("llama")  # SentencePiece: llama.cpp merges by score
    else:
        raise NotExportableError(
            f"{model['type']} tokenizer: llama.cpp reproduces byte-level BPE (gpt2) and "
            "SentencePiece (llama) tokenizers only"
        )
    types = []
    for index, (piece, _) in enumerate(pieces):
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        elif index >= defined:
            types.append(gguf.TokenType.UNUSED)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_token_list([piece for piece, _ in pieces])
    writer.add_token_scores([score for _, score in pieces])
    writer.add_token_types(types)

    config = json.loads((source / "tokenizer_config.json").read_text()) \
        if (source / "tokenizer_config.json").is_file() else {}
    ids = {token["content"]: index for index, token in added.items()}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        token = config.get(key)
        content = token.get("content") if isinstance(token, dict) else token
        if content in ids:
            add(ids[content])
    writer.add_add_bos_token(_adds_bos(spec, config))
    writer.add_add_eos_token(False)


def _has(component: Any, kind: str) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) contains `kind`."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == kind:
        return True
    return any(_has(part, kind) for key in ("pretokenizers", "decoders") for part in component.get(key, []))


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the byte-level BPE's split regex."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    for part in parts:
        if part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return PRE_TOKENIZERS[GPT2_REGEX]
        if part.get("type") == "Split":
            regex = part.get("pattern", {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
    raise NotExportableError("byte-level BPE with a split regex llama.cpp does not know "
                             f"(known: {', '.join(PRE_TOKENIZERS.values())})")


def _adds_bos(spec: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether encoding prepends the BOS token (post-processor template or `add_bos_token`)."""
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    post = spec.get("post_processor") or {}
    single = post.get("single", []) if post.get("type") == "TemplateProcessing" else []
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    return bool(single) and single[0].get("SpecialToken", {}).get("id") == bos
