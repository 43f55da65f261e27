"""Pixel shuffle (upstream InternVLChatModel.pixel_shuffle), v1 and v2."""

from __future__ import annotations

import pytest
import torch

from services.vision_encoder.model import pixel_shuffle


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_shapes(version: str) -> None:
    x = torch.randn(3, 32, 32, 64)
    assert pixel_shuffle(x, 0.5, version).shape == (3, 16, 16, 256)
    assert pixel_shuffle(torch.randn(1, 8, 8, 2), 0.25, version).shape == (1, 2, 2, 32)


def test_v2_hand_checked() -> None:
    # 4x4 grid, 1 channel, value 4*i + j at grid position (i, j).
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 2, 2, 4)
    # Each output cell holds its 2x2 block row-major: (2a, 2b), (2a, 2b+1), (2a+1, 2b), (2a+1, 2b+1).
    expected = torch.tensor([[[0.0, 1, 4, 5], [2, 3, 6, 7]], [[8, 9, 12, 13], [10, 11, 14, 15]]])
    torch.testing.assert_close(out[0], expected, atol=0, rtol=0)


def test_v1_is_v2_transposed() -> None:
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    v1 = pixel_shuffle(x, 0.5, "v1")
    expected = torch.tensor([[[0.0, 1, 4, 5], [8, 9, 12, 13]], [[2, 3, 6, 7], [10, 11, 14, 15]]])
    torch.testing.assert_close(v1[0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_channel_order_general(version: str) -> None:
    # out[n, a, b, (ii*2 + jj)*C + c] == x[n, 2a+ii, 2b+jj, c] (v2); v1 swaps a and b.
    n, side, c = 2, 6, 3
    x = torch.randn(n, side, side, c)
    out = pixel_shuffle(x, 0.5, version)
    for a in range(side // 2):
        for b in range(side // 2):
            cell = out[:, a, b] if version == "v2" else out[:, b, a]
            for ii in range(2):
                for jj in range(2):
                    k = (ii * 2 + jj) * c
                    source = x[:, 2 * a + ii, 2 * b + jj]
                    torch.testing.assert_close(cell[:, k : k + c], source, atol=0, rtol=0)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 5, 5, 4), 0.5, "v2")
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 4, 4, 4), 0.5, "v3")
