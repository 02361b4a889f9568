"""Write the tiny causal-LM folders that the `tiny-*.yaml` recipes use (no network).

    .venv/bin/python recipes/tiny_models.py      # -> recipes/models/tiny-llama, tiny-mixtral

tiny-llama: a 4-block Llama (hidden 128, 4 heads, MLP 256) trained for 200 steps on the
sample sentences, so that compression shows up in perplexity. tiny-mixtral: a
2-block Mixtral with 8 experts (top-2), trained the same way, so that its router
has real preferences for the expert-merging recipe. Weights stay out of git.
"""

from __future__ import annotations

import sys
from pathlib import Path

from squeezeflow.testing import save_model, tiny_llama, tiny_mixtral, train_causal_lm


def main(folder: Path) -> None:
    llama, tokenizer = tiny_llama(hidden=128, layers=4, heads=4, intermediate=256)
    train_causal_lm(llama, tokenizer, steps=200)
    save_model(llama, tokenizer, folder / "tiny-llama")
    mixtral, tokenizer = tiny_mixtral(hidden=64, layers=2, heads=4, intermediate=64, experts=8, top_k=2)
    train_causal_lm(mixtral, tokenizer, steps=200)
    save_model(mixtral, tokenizer, folder / "tiny-mixtral")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "models")
