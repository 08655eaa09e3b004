"""Encoder adapters: official token-mix sizes and semantics, the resolution-agnostic resample MLP."""

import math

import pytest
import torch
import torch.nn.functional as F

from movekd.adapters import ADAPTERS, ResampleMLPAdapter, TokenMixAdapter, build_adapter, resample_tokens


@pytest.mark.parametrize(
    ("teacher", "channels", "grid", "params"),
    [("eva", 1024, (64, 64), 3_409_472), ("convnext", 3072, (32, 32), 3_737_152), ("sam", 256, (64, 64), 2_623_040)],
)
def test_token_mix_official_sizes(teacher, channels, grid, params):
    with torch.device("meta"):
        adapter = build_adapter("token_mix", channels, grid, 1024, (24, 24))
    assert sum(p.numel() for p in adapter.parameters()) == params
    out = adapter(torch.empty(2, grid[0] * grid[1], channels, device="meta"))
    assert out.shape == (2, 576, 1024)


def test_token_mix_hand_computed():
    adapter = TokenMixAdapter(2, (1, 2), 2, (1, 1))
    with torch.no_grad():
        adapter.channel_proj.weight.copy_(torch.eye(2))
        adapter.channel_proj.bias.zero_()
        adapter.token_proj.weight.copy_(torch.tensor([[0.25, 0.75]]))
        adapter.token_proj.bias.fill_(0.5)
    tokens = torch.tensor([[[1.0, -1.0], [2.0, 3.0]]])  # 2 teacher tokens, 2 channels

    def gelu(v):  # exact (erf) GELU, as the official nn.GELU()
        return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))

    expected = torch.tensor([[[0.25 * gelu(1.0) + 0.75 * gelu(2.0) + 0.5, 0.25 * gelu(-1.0) + 0.75 * gelu(3.0) + 0.5]]])
    torch.testing.assert_close(adapter(tokens), expected)


def test_token_mix_mixes_positions_and_rejects_other_grids():
    adapter = build_adapter("token_mix", 8, (4, 4), 6, (2, 2))
    tokens = torch.randn(1, 16, 8)
    moved = tokens.clone()
    moved[0, 0] += 1.0  # change one teacher token: every student token changes (token mixing)
    assert ((adapter(moved) - adapter(tokens)).abs().sum(-1) > 0).all()
    with pytest.raises(ValueError, match=r"expects teacher tokens \[B, 16, 8\].*got \[1, 9, 8\]"):
        adapter(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match=r"\[B, 16, 8\].*got \[1, 16, 5\]"):
        adapter(torch.randn(1, 16, 5))
    with pytest.raises(ValueError, match="student grid"):
        adapter(tokens, (4, 4), (3, 3))


def test_resample_tokens_area_and_bilinear():
    grid = torch.arange(16.0).view(1, 16, 1)  # 4x4 row-major values 0..15
    down = resample_tokens(grid, (4, 4), (2, 2))
    torch.testing.assert_close(down.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))  # 2x2 block means
    up = resample_tokens(torch.tensor([[[0.0], [1.0]]]), (1, 2), (1, 4))
    torch.testing.assert_close(up.flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))  # bilinear, half-pixel
    assert resample_tokens(grid, (4, 4), (4, 4)) is grid
    with pytest.raises(ValueError, match="not the teacher grid"):
        resample_tokens(grid, (3, 3), (2, 2))


def test_resample_mlp_any_resolution_and_per_token_mlp():
    torch.manual_seed(0)
    adapter = build_adapter("resample_mlp", 8, (4, 4), 6, (2, 2))
    assert isinstance(adapter, ResampleMLPAdapter)
    tokens = torch.randn(2, 16, 8)

    def explicit(t, grid, target):  # resample first, then the 2-layer MLP, as specified
        return adapter.fc2(F.gelu(adapter.fc1(resample_tokens(t, grid, target))))

    torch.testing.assert_close(adapter(tokens), explicit(tokens, (4, 4), (2, 2)))
    # other resolutions, also upsampling and mixed, with the same parameters
    for grid, target in [((6, 6), (2, 2)), ((2, 2), (4, 4)), ((3, 5), (4, 4)), ((2, 2), (2, 2))]:
        t = torch.randn(2, grid[0] * grid[1], 8)
        out = adapter(t, grid, target)
        assert out.shape == (2, target[0] * target[1], 6)
        torch.testing.assert_close(out, explicit(t, grid, target), rtol=1e-5, atol=1e-6)
    # a token only affects its own neighbourhood (no token mixing across the image)
    moved = tokens.clone()
    moved[0, 0] += 1.0
    changed = (adapter(moved) - adapter(tokens)).abs().sum(-1)[0] > 0
    assert changed.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"\[B, N, 8\]"):
        adapter(torch.randn(1, 16, 5))


def test_registry():
    assert {"token_mix", "resample_mlp"} <= set(ADAPTERS)
    with pytest.raises(ValueError, match="unknown adapter 'mlp'"):
        build_adapter("mlp", 8, (2, 2), 4, (2, 2))
    assert build_adapter("resample_mlp", 8, (2, 2), 4, (2, 2), hidden_dim=16).fc1.out_features == 16


def test_interpolate_adapter_is_parameter_free_and_resamples_both_axes():
    adapter = build_adapter("interpolate", 6, (4, 4), 3, (2, 2))
    assert sum(p.numel() for p in adapter.parameters()) == 0
    # Channels (0,1), (2,3), (4,5) averaged; each 2x2 block of the 4x4 grid averaged.
    tokens = torch.arange(2 * 16 * 6, dtype=torch.float32).reshape(2, 16, 6)
    out = adapter(tokens)
    grid = tokens.reshape(2, 4, 4, 3, 2).mean(-1)  # channel pairs
    expected = grid.reshape(2, 2, 2, 2, 2, 3).mean((2, 4)).reshape(2, 4, 3)
    assert out.shape == (2, 4, 3) and torch.allclose(out, expected)
    # Growing channels: linear interpolation keeps a constant signal constant and the range.
    wide = build_adapter("interpolate", 3, (2, 2), 8, (2, 2))(torch.full((1, 4, 3), 2.5))
    assert wide.shape == (1, 4, 8) and torch.allclose(wide, torch.full_like(wide, 2.5))
    with pytest.raises(ValueError, match=r"\[B, N, 6\]"):
        adapter(torch.randn(1, 16, 5))
