"""A small deterministic generator of English sentences.

It writes the bundled calibration/evaluation text (`recipes/data/`) and gives tests
text with enough structure for a tiny language model to learn in seconds, so that
compression error shows up in perplexity. Regenerate the bundled files with
`python -m squeezeflow.sampledata recipes/data`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SUBJECTS = [
    "the engineer", "a small team", "the scheduler", "our model", "the new intern",
    "the research group", "a data pipeline", "the night shift", "the customer", "my neighbour",
    "the old server", "a quiet student", "the weather station", "the city council", "the robot",
]
VERBS = [
    "measured", "compressed", "rewrote", "deployed", "tested", "painted", "repaired",
    "described", "ignored", "celebrated", "cooked", "planned", "sold", "studied", "moved",
]
OBJECTS = [
    "the latency of the service", "a fresh loaf of bread", "the quarterly report",
    "a broken bicycle", "the storage budget", "an old sailing boat", "the training data",
    "a pot of tomato soup", "the garden fence", "the summer schedule", "a pile of invoices",
    "the museum exhibition", "the mountain trail map", "a cup of green tea", "the football match",
]
PLACES = [
    "in the morning", "before lunch", "at the harbour", "near the station", "after the storm",
    "during the meeting", "on the roof", "in the library", "at midnight", "by the river",
]
REASONS = [
    "because the deadline was close", "so that everyone could rest", "to save some money",
    "since nobody else would", "while the rain kept falling", "as the manager had asked",
    "although it was very late", "to make the results reproducible",
]
TEMPLATES = [
    "{S} {V} {O} {P}.",
    "{S} {V} {O} {R}.",
    "{P}, {S} {V} {O}.",
    "{S} {V} {O} {P} {R}.",
    "Yesterday {S} {V} {O}.",
    "Did {S} really say that {S2} {V} {O}?",
    "Nobody expected that {S} {V} {O} {P}.",
]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = rng.choice(TEMPLATES).format(
            S=rng.choice(SUBJECTS), S2=rng.choice(SUBJECTS), V=rng.choice(VERBS),
            O=rng.choice(OBJECTS), P=rng.choice(PLACES), R=rng.choice(REASONS),
        )
        out.append(text[0].upper() + text[1:])
    return out


def write_bundled(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calibration.txt").write_text("\n".join(sentences(256, seed=1)) + "\n")
    (folder / "evaluation.txt").write_text("\n".join(sentences(256, seed=2)) + "\n")


if __name__ == "__main__":
    write_bundled(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data"))
