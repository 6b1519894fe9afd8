"""Check that the real model used by the model-aware tests is present and is what they expect."""

from __future__ import annotations

from pathlib import Path

MINILM_SIZE = 90_868_376


def test_minilm_model_is_installed(minilm_model: Path) -> None:
    assert minilm_model.name == "model.safetensors"
    assert minilm_model.stat().st_size == MINILM_SIZE
