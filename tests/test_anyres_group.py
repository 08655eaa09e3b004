"""``group_by_image`` under AnyRes: images of different tile grids (so different token counts) as
shared-prefix groups train exactly like their questions as separate AnyRes samples, ``max_length``
counts each image's own tokens, and a grouped AnyRes stage trains with KD on every crop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from movekd.data import Collator, ConversationEncoder, LlavaDataset
from movekd.data.anyres import default_pinpoints, num_crops
from movekd.vlm import MoveKDVLM, build_projector
from movekd.vlm.anyres import AnyResPacker
from tiny_vlm import TinyVision, batch_loss_and_grads, make_llm, make_tokenizer

QUESTIONS = [("what is the shape?", "circle"), ("what color is the shape?", "red"),
             ("does the image contain a triangle?", "no"), ("is there a blue shape?", "no")]


def write_picture(path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)  # noise: every tile differs
    Image.fromarray(arr).save(path)


def qa(image: str, question: str, answer: str, i: int) -> dict:
    return {"id": f"{image}-{i}", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_grouped_anyres_loss_and_gradients_equal_separate_samples(tmp_path, attn):
    """Two images of 1x2 and 3x1 tiles (3 and 4 crops, 14 and 22 tokens) with 4 and 3 questions:
    one grouped sequence per image gives the loss and gradients of the 7 questions as separate
    AnyRes samples (each encoding its image again)."""
    crop, pinpoints = 16, default_pinpoints(16)
    write_picture(tmp_path / "wide.png", (16, 32), 0)
    write_picture(tmp_path / "tall.png", (48, 16), 1)
    samples = [qa(img, q, a, i) for img in ("wide.png", "tall.png") for i, (q, a) in enumerate(QUESTIONS)][:7]
    tok = make_tokenizer()
    torch.manual_seed(0)
    packer = AnyResPacker(pinpoints, crop, crop // 8, 32)
    llm = make_llm(len(tok), hidden=32)
    llm.config._attn_implementation = attn
    vlm = MoveKDVLM(TinyVision(dim=16, patch=8), build_projector("mlp2x_gelu", 16, 32), llm, anyres=packer).double()
    assert [packer.num_tokens(s) for s in ((16, 32), (48, 16))] == [14, 22]
    enc = ConversationEncoder(tok, "chat", num_image_tokens=packer.max_tokens())
    collate = Collator(tok.pad_token_id)
    options = dict(image_root=tmp_path, image_size=crop, image_aspect_ratio="anyres", grid_pinpoints=pinpoints)

    def loss_and_grads(dataset):
        return batch_loss_and_grads(vlm, collate, dataset)

    grouped = LlavaDataset(samples, enc, group_by_image=True, **options)
    separate = LlavaDataset(samples, enc, **options)
    loss_g, grads_g, batch_g = loss_and_grads(grouped)
    loss_s, grads_s, batch_s = loss_and_grads(separate)
    assert batch_g["images"].crop_counts.tolist() == [3, 4] and "segment_ids" in batch_g
    assert batch_s["images"].crop_counts.tolist() == [3] * 4 + [4] * 3
    torch.testing.assert_close(loss_g, loss_s)
    assert grads_g.keys() == grads_s.keys() and "anyres.image_newline" in grads_g
    for name in grads_s:
        torch.testing.assert_close(grads_g[name], grads_s[name], msg=name)


def _grouped_stage(tmp_path):
    from movekd.train.build import build_system
    from movekd.train.config import load_config
    from train_fixtures import anyres_config

    config = load_config(anyres_config(tmp_path, grouped=True))
    return config, build_system(config)


def test_max_length_keeps_the_questions_that_fit_after_each_images_own_tokens(tmp_path):
    from movekd.train.build import stage_dataset

    config, system = _grouped_stage(tmp_path)
    stage = config.stages[0]
    packer = system.model.vlm.anyres
    unlimited = stage_dataset(system, config, dataclasses.replace(stage, max_length=4096))
    full = unlimited[0]  # a 32x64 canvas, 4 questions
    segments = full["segment_ids"]
    prefix, suffix = int((segments == 0).sum()), [int((segments == i).sum()) for i in range(1, 5)]
    assert full["num_questions"] == 4
    # Room for the largest image (2x2 tiles: 88 tokens) and its first two questions only.
    max_length = prefix - 1 + packer.max_tokens() + suffix[0] + suffix[1]
    dataset = stage_dataset(system, config, dataclasses.replace(stage, max_length=max_length))
    kept, beyond_worst_case = {}, 0
    for index in range(len(dataset)):
        item, whole = dataset[index], unlimited[index]
        if not item["has_image"]:
            continue
        size = tuple(item["image"].image_sizes[0].tolist())
        own = packer.num_tokens(size)
        length = len(item["input_ids"]) - 1 + own  # the LLM length once the placeholder is expanded
        assert length <= max_length, size
        k = item["num_questions"]
        assert torch.equal(item["input_ids"], whole["input_ids"][:len(item["input_ids"])])  # whole questions, in order
        if k < whole["num_questions"]:  # the next question would not have fitted after this image
            assert length + int((whole["segment_ids"] == k + 1).sum()) > max_length, size
        beyond_worst_case += length - own + packer.max_tokens() > max_length
        kept[index] = (size, k)
    assert kept[2] == ((48, 48), 2)  # red, 2x2 tiles: the most tokens, as budgeted
    assert kept[0] == ((32, 64), 3)  # red, 1x2 tiles: 36 fewer tokens, room for a third question
    assert beyond_worst_case  # groups longer than the worst-case count (max_tokens) would have allowed

    # The model expands each row by its own image: the merged lengths are the counted ones.
    batch = Collator(system.pad_token_id)([dataset[i] for i in range(4)])
    with torch.no_grad():
        _, _, mask, _, _ = system.model.vlm.prepare_inputs(
            batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"],
            segment_ids=batch["segment_ids"])
    sizes = [tuple(s) for s in batch["images"].image_sizes.tolist()]
    expected = [int(n) - 1 + packer.num_tokens(s) for n, s in zip(batch["attention_mask"].sum(1), sizes)]
    attend = (mask == 0) if mask.dtype.is_floating_point else mask  # eager's additive mask or SDPA's boolean
    assert attend[:, 0, :, 0].sum(1).tolist() == expected  # every non-padding position sees the first token


def test_grouped_anyres_training_distils_every_crop(tmp_path):
    from movekd.train.build import stage_dataset
    from movekd.train.distributed import batch_item_counts
    from movekd.train.loop import train

    config, system = _grouped_stage(tmp_path)
    dataset = stage_dataset(system, config, config.stages[0])
    batch = Collator(system.pad_token_id)([dataset[i] for i in (0, 1, 3, len(dataset) - 1)])
    images = batch["images"]
    crops = [num_crops(s, default_pinpoints(32), 32) for s in [(32, 64), (64, 32), (32, 96)]]
    assert images.crop_counts.tolist() == crops + [1] and batch["has_image"].tolist() == [True] * 3 + [False]
    assert [dataset[i].get("num_questions", 1) for i in (0, 1, 3)] == [4] * 3  # every question fits in 256
    seen = []
    hooks = [teacher.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[0])))
             for teacher in system.model.teachers]
    cache, system.model.cache = system.model.cache, None
    losses = system.model(images, batch["input_ids"], batch["attention_mask"], batch["labels"],
                          has_image=batch["has_image"], image_keys=[dataset.image_key(i) for i in batch["indices"]],
                          segment_ids=batch["segment_ids"])
    assert seen == [sum(crops)] * 2  # every teacher on every crop of the three images, once per image
    assert losses.counts == batch_item_counts(batch, config.kd)  # what the loop normalises by
    assert torch.isfinite(losses.total)

    for hook in hooks:
        hook.remove()
    system.model.cache = cache
    result = train(config, system=system, show_progress=False)
    first, last = result.stages[0].first, result.stages[0].last
    assert last["text"] < first["text"] and last["kd"] < first["kd"]
