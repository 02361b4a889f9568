"""Which blocks a student keeps, and cutting a model down to them.

A student initialized from its teacher's weights by keeping a subset of its blocks
(DistilBERT, Sanh et al. 2019, keeps every other layer of BERT-base and trains the
result by distillation).
"""

from __future__ import annotations

from torch import nn

from squeezeflow.compression.models import find_blocks

PER_LAYER_CONFIG_LISTS = ("layer_types",)  # config lists with one entry per block


def every_kth(blocks: int, k: int) -> list[int]:
    """Blocks 0, k, 2k, ... (DistilBERT's choice for k = 2)."""
    return list(range(0, blocks, k))


def keep_blocks(model: nn.Module, keep: list[int]) -> None:
    """Cut `model` down to the blocks `keep` (ascending), in place.

    Renumbers `layer_idx` (which indexes the KV cache) and updates
    `num_hidden_layers` and per-block config lists, so that the saved folder is an
    ordinary Hugging Face model that transformers loads with the smaller config.
    """
    prefix, blocks = find_blocks(model)
    kept = [blocks[index] for index in keep]
    parent_name, _, attribute = prefix.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = getattr(model, "config", None)
    if config is None:
        return
    for field in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, field, [values[index] for index in keep])
    config.num_hidden_layers = len(kept)
