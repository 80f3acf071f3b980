"""Engine sizing from the preset's shape, the dtype and a free-memory reading (pure numbers)."""

from __future__ import annotations

import pytest

from workers.runtime.engine.sizing import EngineShape, rows_for

# musicgen-small: 24 layers, 16 heads of 64; a 30 s window is 1503 decoding steps.
SMALL_BF16 = EngineShape(layers=24, heads=16, head_dim=64, positions=1503, prompt_tokens=0,
                         dtype_bytes=2)
GIB = 2**30


def test_a_rows_cache_is_what_the_issue_measured() -> None:
    # Issue 22: small's self-attention cache at 64 rows in bf16 is 18.9 GB; medium 56.7 GB.
    assert 64 * SMALL_BF16.row_bytes == pytest.approx(18.9e9, rel=0.01)
    medium = EngineShape(layers=48, heads=24, head_dim=64, positions=1503, prompt_tokens=0,
                         dtype_bytes=2)
    assert 64 * medium.row_bytes == pytest.approx(56.7e9, rel=0.01)
    fp32 = EngineShape(**{**SMALL_BF16.__dict__, "dtype_bytes": 4})
    assert fp32.row_bytes == 2 * SMALL_BF16.row_bytes
    with_prompt = EngineShape(**{**SMALL_BF16.__dict__, "prompt_tokens": 128})
    assert with_prompt.row_bytes == SMALL_BF16.row_bytes * (1503 + 128) // 1503


def test_rows_fit_the_share_of_free_memory() -> None:
    # An H100 with 70 GiB free after the model: 60% of it holds 152 small bf16 rows.
    sized = rows_for(64, SMALL_BF16, free_bytes=70 * GIB, fraction=0.6)
    assert sized.rows == 64 and sized.budget_bytes == int(70 * GIB * 0.6)
    # 10 GiB free: 6 GiB of budget is 21 rows of ~282 MiB.
    small_card = rows_for(64, SMALL_BF16, free_bytes=10 * GIB, fraction=0.6)
    assert small_card.rows == 6 * GIB // SMALL_BF16.row_bytes == 21
    assert "21 rows (asked 64)" in small_card.line() and "6.00 GiB" in small_card.line()
    assert rows_for(64, SMALL_BF16, free_bytes=SMALL_BF16.row_bytes, fraction=0.6).rows == 0


def test_without_a_reading_the_rows_are_as_asked() -> None:
    sized = rows_for(8, SMALL_BF16, free_bytes=None, fraction=0.6)  # the CPU
    assert sized.rows == 8 and sized.budget_bytes is None
    assert sized.line().startswith("8 rows as asked")
