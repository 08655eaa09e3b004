"""Evaluation with each image's prompt prefix run once (movekd.eval.shared_prefix): the same greedy
answers as separate prompts, plain and AnyRes, with skips, EOS and fallbacks; whole-image sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_vlm import TinyVision, make_llm, make_tokenizer

from movekd.data import Collator, ConversationEncoder, LlavaDataset
from movekd.data.anyres import default_pinpoints
from movekd.data.templates import IMAGE_TOKEN_INDEX
from movekd.eval import evaluate_vqa
from movekd.eval.shared_prefix import can_share_prefix, generate_batch, image_batches
from movekd.vlm import MoveKDVLM, build_projector
from movekd.vlm.anyres import AnyResPacker
from movekd.vlm.shared_generate import shared_prefix_length

QUESTIONS = ["what is the shape?", "what color is the shape?", "does the image contain a triangle?",
             "is there a blue shape?", "is there not a red circle in the image?"]


def write_picture(path, size: tuple[int, int], seed: int) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def qa(image: str, question: str, i: int) -> dict:
    return {"id": f"{image}-{i}", "image": image, "type": "shape",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "circle"}]}


def tiny_vlm(tok, attn: str, anyres: AnyResPacker | None = None) -> MoveKDVLM:
    torch.manual_seed(0)
    llm = make_llm(len(tok), hidden=32)
    llm.config._attn_implementation = attn
    return MoveKDVLM(TinyVision(dim=16, patch=8), build_projector("mlp2x_gelu", 16, 32), llm, anyres=anyres)  # fp32: HF eager attention gives left-padded rows NaN in float64


def setups():
    """(name, image sizes (h, w), evaluate_vqa options, packer): square images, and AnyRes images of
    three tile grids (3, 4 and 5 crops: prefixes of different lengths, left-padded in one batch)."""
    pinpoints = default_pinpoints(16)
    return [("plain", [(16, 16)] * 3, dict(image_size=16), None),
            ("anyres", [(16, 32), (48, 16), (32, 32)],
             dict(image_size=16, image_aspect_ratio="anyres", grid_pinpoints=pinpoints),
             AnyResPacker(pinpoints, 16, 2, 32))]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["plain", "anyres"])
def test_shared_prefix_answers_equal_separate_prompts(tmp_path, attn, mode, monkeypatch):
    """Three images with 5, 1 and 3 questions of different lengths (one more question's image is
    missing): with each image's prefix shared, every step's logits equal those of separate prompts
    (HF ``generate``), evaluation gives the same answers, and it never falls back to whole prompts."""
    _, sizes, options, packer = next(s for s in setups() if s[0] == mode)
    for k, size in enumerate(sizes):
        write_picture(tmp_path / f"{k}.png", size, k)
    samples = ([qa("0.png", q, i) for i, q in enumerate(QUESTIONS)] + [qa("1.png", QUESTIONS[3], 0)]
               + [qa("2.png", q, i) for i, q in enumerate(QUESTIONS[:3])] + [qa("gone.png", QUESTIONS[0], 0)])
    tok = make_tokenizer()
    vlm = tiny_vlm(tok, attn, packer)
    dataset = LlavaDataset(samples[:-1], ConversationEncoder(tok, "chat"), image_root=tmp_path, prompt_only=True,
                           **options)
    batch = Collator(tok.pad_token_id, padding_side="left")([dataset[i] for i in range(len(samples) - 1)])
    gen = dict(max_new_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = vlm.generate(batch["images"], batch["input_ids"], batch["attention_mask"], output_logits=True,
                            return_dict_in_generate=True, **gen)
    tokens, logits = generate_batch(vlm, batch, samples, return_logits=True, **gen)
    torch.testing.assert_close(logits, torch.stack(expected.logits, 1), rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, expected.sequences)

    run = dict(image_root=tmp_path, batch_size=6, max_new_tokens=4, return_predictions=True, **options)
    separate = evaluate_vqa(vlm, tok, samples, share_image_prefix=False, **run)
    monkeypatch.setattr(vlm, "generate", lambda *a, **k: pytest.fail("fell back to separate prompts"))
    shared = evaluate_vqa(vlm, tok, samples, **run)
    assert shared["skipped"] == separate["skipped"] == 1
    preds = [p["prediction"] for p in shared["predictions"]]
    assert preds == [p["prediction"] for p in separate["predictions"]]
    assert preds[-1] is None and len(set(preds[:-1])) > 1  # the missing image; answers differ per question


def test_a_row_stopping_at_eos_is_padded_as_generate_pads_it(tmp_path):
    """EOS set to the first token the model gives one question: that row stops there (pad after it)
    while the others go on, as ``MoveKDVLM.generate`` does."""
    for k in range(2):
        write_picture(tmp_path / f"{k}.png", (16, 16), k)
    samples = [qa("0.png", q, i) for i, q in enumerate(QUESTIONS)] + [qa("1.png", QUESTIONS[1], 0)]
    tok = make_tokenizer()
    vlm = tiny_vlm(tok, "eager")
    dataset = LlavaDataset(samples, ConversationEncoder(tok, "chat"), image_root=tmp_path, image_size=16,
                           prompt_only=True)
    batch = Collator(tok.pad_token_id, padding_side="left")([dataset[i] for i in range(len(samples))])
    pad = tok.pad_token_id

    def separate(eos):
        return vlm.generate(batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=5,
                            eos_token_id=eos, pad_token_id=pad)

    eos = int(separate(None)[2, 0])  # run to max_new_tokens first, then stop row 2 at once
    expected = separate(eos)
    got = generate_batch(vlm, batch, samples, max_new_tokens=5, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(got, expected[:, :got.shape[1]]) and (expected[:, got.shape[1]:] == pad).all()
    assert got[2, 0] == eos and (got[2, 1:] == pad).all() and got.shape[1] > 1


def test_shared_prefix_length_keeps_each_prompts_last_token_and_needs_the_image():
    img = IMAGE_TOKEN_INDEX
    rows = [torch.tensor([5, img, 7, 8, 9]), torch.tensor([5, img, 7, 8, 4, 4])]
    assert shared_prefix_length(rows) == 4
    assert shared_prefix_length([torch.tensor([5, img, 7]), torch.tensor([5, img, 7])]) == 2  # identical: last kept
    assert shared_prefix_length([torch.tensor([5, img, 7])]) == 2  # one question: all but its last token
    assert shared_prefix_length([torch.tensor([5, 6, img]), torch.tensor([5, 7, img])]) == 0  # image not shared


def test_image_batches_keep_each_images_questions_together():
    samples = [{"image": name} for name in ["a", "b", "a", "c", "b", "a"]] + [{"id": "text"}]
    order = [3, 6, 1, 0, 2, 4, 5]  # c first, then the text sample, then b (index 1), then a
    assert image_batches(samples, order, batch_size=3) == [[3, 6], [1, 4], [0, 2, 5]]
    assert image_batches(samples, order, batch_size=2) == [[3, 6], [1, 4], [0, 2, 5]]  # a alone: over the size


def test_sampling_and_generation_options_that_keep_separate_prompts(tmp_path):
    tok = make_tokenizer()
    vlm = tiny_vlm(tok, "eager")
    assert can_share_prefix(vlm, {}) and not can_share_prefix(vlm, {"do_sample": True})
    vlm.llm.generation_config.repetition_penalty = 1.3  # changes greedy's argmax: HF's generate must run
    assert not can_share_prefix(vlm, {})


def test_whole_image_sampling_draws_every_question_of_random_images(tmp_path):
    import json

    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import eval_samples

    samples = [qa(f"{k}.png", q, i) for k in range(20) for i, q in enumerate(QUESTIONS[: 2 + k % 4])]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(samples))
    drawn, _ = eval_samples(EvalConfig(data=str(path), max_samples=30, seed=1, sample_by="image"))
    assert len(drawn) == 30 and drawn == eval_samples(EvalConfig(data=str(path), max_samples=30, seed=1,
                                                                 sample_by="image"))[0]
    images = [s["image"] for s in drawn]
    complete = {k for k in set(images) if images.count(k) == sum(s["image"] == k for s in samples)}
    assert set(images) - {images[-1]} <= complete  # whole images; only the last one drawn may be cut
    assert len(set(images)) < 15  # whole images, not 30 questions scattered over most of the 20
    by_question, _ = eval_samples(EvalConfig(data=str(path), max_samples=30, seed=1))
    assert len(by_question) == 30 and by_question != drawn
