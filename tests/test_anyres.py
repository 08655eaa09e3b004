"""AnyRes tiling (LLaVA-NeXT) against Hugging Face's own processor and model functions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from movekd.data.anyres import (AnyResImages, anyres_crops, check_pinpoints, default_pinpoints, grid_shape,
                                num_crops, select_best_resolution)
from movekd.vlm.anyres import AnyResPacker, unpad_bounds

S = 16  # crop side (the student's input)
PINPOINTS = default_pinpoints(S) + [[3 * S, 3 * S]]
# (height, width): wide, tall, square, extreme, tiny, odd margins
SIZES = [(20, 44), (44, 20), (30, 30), (10, 70), (70, 12), (7, 9), (33, 50), (50, 33), (100, 41), (16, 32)]


def test_tile_selection_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches)

    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(5, 200, 2)) for _ in range(200)]
    for size in sizes:
        assert select_best_resolution(size, PINPOINTS) == tuple(hf_select(size, PINPOINTS)), size
        assert grid_shape(size, PINPOINTS, S) == tuple(get_anyres_image_grid_shape(list(size), PINPOINTS, S))
        assert num_crops(size, PINPOINTS, S) == image_size_to_num_patches(list(size), PINPOINTS, S)
    # not all the same pick: the grid really depends on the aspect ratio
    assert len({select_best_resolution(size, PINPOINTS) for size in SIZES}) >= 4


@pytest.mark.parametrize("size", SIZES)
def test_crops_equal_the_llava_next_image_processor(size):
    from transformers import LlavaNextImageProcessor

    image = torch.from_numpy(np.random.default_rng(sum(size)).integers(0, 256, (3, *size), dtype=np.uint8))
    ours = anyres_crops(image, PINPOINTS, S)
    processor = LlavaNextImageProcessor(size={"height": S, "width": S}, crop_size={"height": S, "width": S},
                                        image_grid_pinpoints=PINPOINTS, do_center_crop=False, do_rescale=False,
                                        do_normalize=False, do_pad=False)
    out = processor(images=image, return_tensors="pt")
    theirs = out["pixel_values"][0]
    assert ours.shape == theirs.shape == (num_crops(size, PINPOINTS, S), 3, S, S)
    assert out["image_sizes"][0].tolist() == list(size)
    assert (ours.float() - theirs.float()).abs().max() == 0


@pytest.mark.parametrize("size", SIZES)
def test_unpadding_matches_transformers(size):
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    for current in [(8, 16), (16, 8), (12, 12), (4, 12), (24, 8)]:
        grid = torch.arange(current[0] * current[1], dtype=torch.float).reshape(1, *current)
        top, bottom, left, right = unpad_bounds(size, current)
        assert torch.equal(grid[:, top:bottom, left:right], unpad_image(grid, list(size)))


def _hf_pack(features, images, packer, patch):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    owner = SimpleNamespace(config=SimpleNamespace(image_grid_pinpoints=packer.pinpoints,
                                                   vision_config=SimpleNamespace(image_size=S, patch_size=patch)))
    per_image = torch.split(features, images.crop_counts.tolist())
    packed, lengths = LlavaNextModel.pack_image_features(owner, per_image, images.image_sizes, "default",
                                                         image_newline=packer.image_newline)
    return packed, lengths


def test_token_sequence_equals_llava_next_packing():
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    patch, dim = 4, 6
    g = S // patch
    packer = AnyResPacker(PINPOINTS, S, g, dim)
    batch = AnyResImages.cat([AnyResImages.single(anyres_crops(torch.zeros(3, *size, dtype=torch.uint8), PINPOINTS, S),
                                                  size) for size in SIZES])
    features = torch.randn(batch.crops.shape[0], g * g, dim)
    ours = packer.pack(features, batch)
    theirs, lengths = _hf_pack(features, batch, packer, patch)
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS), patch_size=patch,
                           num_additional_image_tokens=1)
    proc._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(proc, *a)
    for size, mine, hf, n in zip(SIZES, ours, theirs, lengths.tolist()):
        assert torch.equal(mine, hf)
        assert packer.num_tokens(size) == len(mine) == n
        # the processor's count of <image> tokens (its CLS removed again for "default")
        assert LlavaNextProcessor._get_number_of_features(proc, *size, S, S) - 1 == n
        assert n <= packer.max_tokens()
    # a single blank crop (text-only sample): its tokens and one newline, as HF's one-patch branch
    blank = AnyResImages.blank(S)
    single = packer.pack(torch.randn(1, g * g, dim), blank)[0]
    assert single.shape == (g * g + 1, dim) and torch.equal(single[-1], packer.image_newline.detach())


def test_pinpoints_are_checked():
    assert check_pinpoints([[16, 32]], 16) == [[16, 32]]
    with pytest.raises(ValueError, match=r"image_grid_pinpoints: \[16, 30\]"):
        check_pinpoints([[16, 30]], 16)
    with pytest.raises(ValueError, match="empty"):
        check_pinpoints([], 16)


def test_merge_places_variable_length_images():
    from movekd.vlm.model import merge_image_tokens

    dim = 3
    text = torch.randn(2, 4, dim)
    ids = torch.tensor([[5, -200, 7, 8], [0, 6, -200, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    images = [torch.full((2, dim), 1.0), torch.full((5, dim), 2.0)]
    for side in ("right", "left"):
        embeds, new_mask, pos, _ = merge_image_tokens(text, ids, mask, None, images, padding_side=side)
        assert embeds.shape == (2, 8, dim)
        row0 = embeds[0, new_mask[0].bool()]
        row1 = embeds[1, new_mask[1].bool()]
        assert torch.equal(row0, torch.cat([text[0, :1], images[0], text[0, 2:]]))
        assert torch.equal(row1, torch.cat([text[1, 1:2], images[1], text[1, 3:]]))
        assert new_mask.sum(1).tolist() == [5, 7]
