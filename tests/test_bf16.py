"""bf16 training: the same learning as fp32, and the training forward's bf16 shortcuts exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import recipe_of
from finetune.model import RMSNorm, apply_rotary, rotary_cos_sin
from tests.conftest import SMALL_MODEL, logged_losses, small_params

STEPS = 30


def losses_of_run(checkpoint: Path, out: Path, recipe: str, dtype: str) -> list[float]:
    params = small_params(
        checkpoint,
        out,
        f"recipe={recipe}",
        f"dtype={dtype}",
        f"max_steps={STEPS}",
        "log_every_n_steps=1",
        "lr=1e-3",
        "warmup_steps=0",
    )
    recipe_of(params).run(params)
    return [loss for _, loss in logged_losses(out)]


@pytest.mark.parametrize("recipe", ["full", "lora"])
def test_bf16_run_learns_as_fp32_does(recipe: str, small_checkpoint: Path, tmp_path: Path) -> None:
    fp32 = losses_of_run(small_checkpoint, tmp_path / "fp32", recipe, "fp32")
    bf16 = losses_of_run(small_checkpoint, tmp_path / "bf16", recipe, "bf16")
    assert len(fp32) == len(bf16) == STEPS
    assert fp32[-1] < fp32[0] - 0.1  # it learned, so equal losses say something
    assert bf16[-1] == pytest.approx(fp32[-1], abs=0.01)


def test_rms_norm_under_autocast_gives_the_bf16_cast_of_its_fp32_output() -> None:
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    fp32 = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = norm(x)
    assert fp32.dtype == torch.float32
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, fp32.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_equals_the_reference_rotation_exactly(dtype: torch.dtype) -> None:
    x = torch.randn(2, 4, 7, SMALL_MODEL.head_dim, generator=torch.Generator().manual_seed(2))
    x = x.to(dtype)
    cos, signed_sin = (t[3:] for t in rotary_cos_sin(SMALL_MODEL, 10, torch.device("cpu")))  # 3..9
    half = SMALL_MODEL.head_dim // 2
    angles = torch.arange(3, 10).unsqueeze(1) / 10000.0 ** (torch.arange(half) / half)
    sin = torch.cat([angles, angles], dim=-1).sin()
    torch.testing.assert_close(cos, torch.cat([angles, angles], dim=-1).cos())
    torch.testing.assert_close(signed_sin, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1))
    first, second = x.chunk(2, dim=-1)
    unsigned = torch.cat([-signed_sin[:, :half], signed_sin[:, half:]], dim=-1)
    reference = x * cos.to(dtype) + torch.cat([-second, first], dim=-1) * unsigned.to(dtype)
    assert torch.equal(apply_rotary(x, cos, signed_sin), reference)
