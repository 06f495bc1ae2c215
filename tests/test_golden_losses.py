"""Stored losses: the first steps of the shipped default runs must not drift.

A change to the numerics that still "learns" passes every other test; this one catches it. To
update the stored values deliberately, after checking why they moved:
`FINETUNE_WRITE_GOLDEN=1 pytest tests/test_golden_losses.py`, and commit tests/golden/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.config import build_params, recipe_of
from tests.conftest import compose_config, logged_losses

GOLDEN_DIR = Path(__file__).parent / "golden"
STEPS = 5
TOLERANCE = 1e-4


def first_losses(recipe: str, out: Path) -> list[float]:
    """The losses of the first STEPS steps of `python -m finetune recipe=<recipe>` (fp32, CPU)."""
    overrides = [f"recipe={recipe}", f"output_dir={out}", f"max_steps={STEPS}", "device=cpu"]
    params = build_params(compose_config([*overrides, "log_every_n_steps=1", "dtype=fp32"]))
    recipe_of(params).run(params)
    return [loss for _, loss in logged_losses(out)]


@pytest.mark.parametrize("recipe", ["full", "lora"])
def test_default_run_reproduces_its_stored_first_losses(recipe: str, tmp_path: Path) -> None:
    losses = first_losses(recipe, tmp_path)
    golden = GOLDEN_DIR / f"{recipe}_losses.json"
    if os.environ.get("FINETUNE_WRITE_GOLDEN") == "1":
        golden.write_text(json.dumps(losses, indent=1) + "\n")
    expected = json.loads(golden.read_text())
    assert len(losses) == len(expected) == STEPS
    assert losses == pytest.approx(expected, abs=TOLERANCE)
