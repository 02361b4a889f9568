from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Inputs drawn with the global generator are the same whatever runs first."""
    torch.manual_seed(0)
