"""Shared-prefix question groups (``group_by_image``): layout, masks, and exact equivalence with
separate single-question samples."""

from __future__ import annotations

import pytest
import torch

from movekd.data import Collator, ConversationEncoder, EncodingError, LlavaDataset
from movekd.data.shared_prefix import group_by_image, merge_shared_prefix
from movekd.data.templates import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from movekd.vlm import MoveKDVLM, build_projector
from movekd.vlm.model import segment_attention
from tiny_vlm import TinyVision, batch_loss_and_grads, make_llm, make_tokenizer, write_image

QUESTIONS = [("what is the shape?", "circle"), ("what color is the shape?", "red"),
             ("does the image contain a triangle?", "no"), ("is there a blue shape?", "no")]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def qa(image: str, question: str, answer: str, i: int) -> dict:
    return {"id": f"{image}-{i}", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def test_group_by_image_order_chunks_and_text_only():
    samples = [{"image": "a"}, {"image": "b"}, {}, {"image": "a"}, {"image": "a"}, {}]
    assert group_by_image(samples) == [[0, 3, 4], [1], [2], [5]]
    assert group_by_image(samples, max_per_group=2) == [[0, 3], [4], [1], [2], [5]]
    with pytest.raises(ValueError, match="max_per_group"):
        group_by_image(samples, max_per_group=0)


def test_merge_layout_reproduces_each_question(tok):
    enc = ConversationEncoder(tok, "chat", num_image_tokens=4)
    singles = [enc.encode(qa("x.png", q, a, i)["conversations"], True) for i, (q, a) in enumerate(QUESTIONS)]
    merged, segments, kept = merge_shared_prefix(singles, num_image_tokens=4)
    assert kept == len(QUESTIONS)
    prefix = merged.input_ids[segments == 0]
    assert bool((prefix == IMAGE_TOKEN_INDEX).any()) and bool((merged.labels[segments == 0] == IGNORE_INDEX).all())
    for i, single in enumerate(singles, 1):
        own = torch.cat([prefix, merged.input_ids[segments == i]])
        torch.testing.assert_close(own, single.input_ids)
        torch.testing.assert_close(torch.cat([merged.labels[segments == 0], merged.labels[segments == i]]),
                                   single.labels)
        assert int(merged.labels[segments == i][0]) == IGNORE_INDEX  # never predicted across segments
    # A length budget keeps whole questions only, in order.
    budget = len(prefix) + 3 + sum(int((segments == i).sum()) for i in (1, 2))  # image counts 4
    cut, cut_segments, cut_kept = merge_shared_prefix(singles, max_length=budget, num_image_tokens=4)
    assert cut_kept == 2 and int(cut_segments.max()) == 2
    with pytest.raises(EncodingError, match="not one question fits"):
        merge_shared_prefix(singles, max_length=len(prefix) + 3, num_image_tokens=4)


def test_merge_needs_the_image_in_the_prefix(tok):
    enc = ConversationEncoder(tok, "plain")
    a = enc.encode([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "red circle"}], True)
    b = enc.encode([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "blue circle"}], True)
    with pytest.raises(EncodingError, match="share no prefix"):
        merge_shared_prefix([a, b])  # plain: the answer follows the image directly


def test_segment_attention_mask_and_positions():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    pos, mask = segment_attention(seg)
    assert pos[0, :7].tolist() == [0, 1, 2, 3, 2, 3, 4]
    m = mask[0, 0]
    assert m[4].tolist() == [True, True, False, False, True, False, False, False]  # q2 sees prefix + itself
    assert m[3].tolist()[:4] == [True, True, True, True] and not bool(m[3, 4:].any())
    assert m[7].tolist() == [False] * 7 + [True]  # padding row: itself only
    _, additive = segment_attention(seg, additive_dtype=torch.float32)
    assert bool((additive[0, 0][m] == 0).all()) and bool((additive[0, 0][~m] < -1e30).all())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_grouped_loss_and_gradients_equal_separate_samples(tok, tmp_path, attn):
    """The point of the layout: one grouped sequence per image trains exactly like its questions
    as separate samples (same loss = mean over supervised tokens, same gradients)."""
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        write_image(tmp_path / name, color, size=16)
    samples = [qa(img, q, a, i) for img in ("a.png", "b.png") for i, (q, a) in enumerate(QUESTIONS)]
    samples = samples[:7]  # b.png gets 3 questions: groups of unequal length (padding)
    torch.manual_seed(0)
    vision = TinyVision(dim=16, patch=8)
    llm = make_llm(len(tok), hidden=32)
    llm.config._attn_implementation = attn
    vlm = MoveKDVLM(vision, build_projector("mlp2x_gelu", 16, 32), llm).double()
    enc = ConversationEncoder(tok, "chat", num_image_tokens=4)
    collate = Collator(tok.pad_token_id)

    def loss_and_grads(dataset):
        return batch_loss_and_grads(vlm, collate, dataset)[:2]

    grouped = LlavaDataset(samples, enc, image_root=tmp_path, image_size=16, group_by_image=True)
    separate = LlavaDataset(samples, enc, image_root=tmp_path, image_size=16)
    assert len(grouped) == 2 and grouped[0]["num_questions"] == 4 and grouped[1]["num_questions"] == 3
    loss_g, grads_g = loss_and_grads(grouped)
    loss_s, grads_s = loss_and_grads(separate)
    torch.testing.assert_close(loss_g, loss_s)
    assert grads_g.keys() == grads_s.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_g[name], grads_s[name], msg=name)


def test_grouped_dataset_rejects_prompt_only(tok):
    with pytest.raises(ValueError, match="group_by_image"):
        LlavaDataset([], ConversationEncoder(tok, "chat"), prompt_only=True, group_by_image=True)
