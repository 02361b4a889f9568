"""`gptq`: a packed squeezeflow folder written as a standard GPTQ checkpoint.

The checkpoint is what transformers (+ optimum and gptqmodel) loads with
`AutoModelForCausalLM.from_pretrained`; its layout is `quantization/gptq/export.py`'s
(`export_gptq`), which reads the integer weight format's stored codes, scales and zero
points, so this module only loads the folder and checks that it can be expressed.

Exportable: a causal LM with nn.Linear blocks (checked: Llama, Qwen2 and OPT export and
reload in transformers with gptqmodel, logits within 3e-3) whose block Linears were
quantized by `gptq` or `rtn` with one bits / group size / symmetry for all of them.
Refused, with the reason: encoders (GPTQ checkpoints are loaded through the causal-LM
path only); GPT-2-style Conv1D blocks (the checkpoint writes, but transformers 5.24 with
gptqmodel 7.6 fails to load it: GPT-2's weight init reads `c_proj.weight`, which the
GPTQ layer replaces); models without
integer-quantized Linears (e.g. pruned, NF4 or low-rank only), SmoothQuant input
scales, and mixed settings; `export_gptq` names the layer in each case.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from squeezeflow.compression.exports.base import NotExportableError

log = logging.getLogger(__name__)


def export(source: Path, out: Path) -> dict[str, float]:
    """Write the squeezeflow folder `source` as a GPTQ checkpoint at `out`; its figures."""
    from squeezeflow.compression.artifact import FORMAT_FILE, load_compressed
    from squeezeflow.compression.quantization.gptq.export import export_gptq, integer_layers

    description = Path(source) / FORMAT_FILE
    kind = json.loads(description.read_text()).get("kind") if description.is_file() else None
    if kind is not None and kind != "causal-lm":  # refused before the weights load
        raise NotExportableError(
            f"{source} holds an {kind} model; GPTQ checkpoints are causal-LM checkpoints "
            "(transformers loads them with AutoModelForCausalLM through optimum/gptqmodel), "
            "so export it with save_compressed or as compressed-tensors instead"
        )
    loaded = load_compressed(source)  # dense runtime: each Linear carries its stored codes
    if loaded.kind != "causal-lm":
        raise NotExportableError(f"{source} holds an {loaded.kind} model; GPTQ checkpoints are "
                                 "causal-LM checkpoints")
    conv1d = [name for name, module in loaded.model.named_modules() if type(module).__name__ == "Conv1D"]
    if conv1d:
        raise NotExportableError(
            f"{source} has GPT-2-style Conv1D layers ({conv1d[0]}, ...): transformers loads "
            "their GPTQ checkpoints with an error (GPT-2's weight init reads c_proj.weight, "
            "which the GPTQ layer replaces), so no GPTQ export is written for them"
        )
    layers = integer_layers(loaded.model)
    if not layers:
        raise NotExportableError(
            f"{source} has no integer-quantized Linear layers (quantize it with the gptq or "
            "rtn step): a GPTQ checkpoint stores int codes, scales and zero points"
        )
    # config.json would carry the folder it was read from (a temporary download): the
    # export of one version must have one digest wherever its source was unpacked
    loaded.model.config.name_or_path = ""
    try:
        export_gptq(loaded.model, loaded.tokenizer, out)
    except ValueError as error:  # a setting the format cannot hold; the message names the layer
        raise NotExportableError(str(error)) from error
    bits = {q.bits for q in layers.values()}
    return {
        "quantized_layers": float(len(layers)),
        "bits": float(bits.pop()),  # export_gptq accepts one bit width for all layers
    }
