"""movekd.data: LLaVA JSON loading/validation, templates and labels, image decoding, skipping, collation."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader
from tiny_vlm import make_tokenizer, write_image, write_json

from movekd.data import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    Collator,
    ConversationEncoder,
    EncodingError,
    LlavaDataset,
    LlavaFormatError,
    SkipCounter,
    Skipped,
    check_images,
    load_llava_json,
    pad_sequences,
    read_image,
    scan_llava,
)

CONV2 = [
    {"from": "human", "value": "What is the shape?\n<image>"},
    {"from": "gpt", "value": "circle"},
    {"from": "human", "value": "color?"},
    {"from": "gpt", "value": "red"},
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _expected(tok, segments):
    """Concatenate (text, supervised) segments; None text = the image placeholder."""
    ids, labels = [], []
    for text, sup in segments:
        piece = [IMAGE_TOKEN_INDEX] if text is None else _ids(tok, text)
        ids += piece
        labels += piece if sup else [IGNORE_INDEX] * len(piece)
    return ids, labels


# ------------------------------------------------------------------------------------ templates
def test_chat_template_labels_exact(tok):
    enc = ConversationEncoder(tok, "chat").encode(CONV2, has_image=True)
    ids, labels = _expected(tok, [
        ("<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\n", False),
        (None, False),  # the tag moved to the start of the first human turn, as in LLaVA
        ("\nWhat is the shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("circle<|im_end|>", True),  # answer + end-of-turn supervised, not the newline after it
        ("\n<|im_start|>user\ncolor?<|im_end|>\n<|im_start|>assistant\n", False),
        ("red<|im_end|>", True),
        ("\n", False),
    ])
    assert enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == labels
    assert (enc.input_ids == IMAGE_TOKEN_INDEX).sum() == 1


def test_v1_fallback_without_chat_template_and_bos():
    tok = make_tokenizer(chat_template=None, bos=True)
    enc = ConversationEncoder(tok, "chat")
    assert enc.template.name == "v1"
    e = enc.encode(CONV2, has_image=True)
    assert e.input_ids[0] == tok.bos_token_id  # this tokenizer adds BOS by itself, so the template does too
    supervised = [t for t in e.labels.tolist() if t != IGNORE_INDEX]
    assert tok.decode(supervised) == " circle<|im_end|> red<|im_end|>"
    prompt = enc.encode_prompt(CONV2, has_image=True).input_ids.tolist()
    assert tok.decode([t for t in prompt if t >= 0]).endswith("USER: color? ASSISTANT:")


def test_plain_template(tok):
    conv = [{"from": "human", "value": "Describe the image. <image>"}, {"from": "gpt", "value": "a red circle"}]
    enc = ConversationEncoder(tok, "plain")
    e = enc.encode(conv, has_image=True)
    ids, labels = _expected(tok, [(None, False), ("a red circle", True), ("<|im_end|>", True)])
    assert e.input_ids.tolist() == ids and e.labels.tolist() == labels
    assert enc.encode_prompt(conv, has_image=True).input_ids.tolist() == [IMAGE_TOKEN_INDEX]
    with pytest.raises(EncodingError):
        enc.encode(CONV2, has_image=True)  # plain is single-turn


def test_plain_bos_modes():
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}]
    tok = make_tokenizer()
    tok.bos_token = "<|im_start|>"  # a BOS the tokenizer does not add by itself, as SmolLM2's
    bos_id = tok.convert_tokens_to_ids("<|im_start|>")
    auto = ConversationEncoder(tok, "plain").encode(conv, has_image=True)
    always = ConversationEncoder(tok, "plain", bos="always").encode(conv, has_image=True)
    assert auto.input_ids[0] == IMAGE_TOKEN_INDEX  # LLaVA's rule: BOS only if the tokenizer adds one
    assert always.input_ids.tolist() == [bos_id] + auto.input_ids.tolist()
    assert always.labels.tolist() == [IGNORE_INDEX] + auto.labels.tolist()  # BOS is never supervised
    adds_bos = make_tokenizer(chat_template=None, bos=True)
    never = ConversationEncoder(adds_bos, "plain", bos="never").encode(conv, has_image=True)
    assert never.input_ids[0] == IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match="bos: 'always' needs a tokenizer with a bos_token"):
        ConversationEncoder(make_tokenizer(), "plain", bos="always")
    with pytest.raises(ValueError, match="bos must be one of"):
        ConversationEncoder(tok, "plain", bos="sometimes")


def test_text_only_and_prompt(tok):
    enc = ConversationEncoder(tok, "chat")
    conv = [{"from": "human", "value": "color?"}, {"from": "gpt", "value": "red"}]
    e = enc.encode(conv, has_image=False)
    assert (e.input_ids == IMAGE_TOKEN_INDEX).sum() == 0
    p = enc.encode_prompt(conv, has_image=False).input_ids.tolist()
    assert tok.decode(p).endswith("<|im_start|>user\ncolor?<|im_end|>\n<|im_start|>assistant\n")
    n = len(p)
    assert e.input_ids[:n].tolist() == p and (e.labels[:n] == IGNORE_INDEX).all()


def test_truncation_rule(tok):
    full = ConversationEncoder(tok, "chat").encode(CONV2, has_image=True)
    L = len(full.input_ids)
    # The placeholder counts as num_image_tokens: the length that matters is after expansion.
    # 1 placeholder x 4 image tokens = L + 3 positions, so max_length=L drops the last 3 tokens.
    enc = ConversationEncoder(tok, "chat", max_length=L, num_image_tokens=4)
    e = enc.encode(CONV2, has_image=True)
    assert e.input_ids.tolist() == full.input_ids[: L - 3].tolist()  # cut on the right
    assert e.labels.tolist() == full.labels[: L - 3].tolist()
    with pytest.raises(EncodingError, match="image placeholder"):
        ConversationEncoder(tok, "chat", max_length=8, num_image_tokens=4).encode(CONV2, has_image=True)
    first_answer = full.labels.tolist().index(_ids(tok, "circle")[0])
    with pytest.raises(EncodingError, match="no supervised"):
        ConversationEncoder(tok, "chat", max_length=first_answer).encode(CONV2, has_image=True)


# ------------------------------------------------------------------------------------ JSON
def test_malformed_json_names_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "conversations": []},\n {"id": "b",, }]')
    with pytest.raises(LlavaFormatError, match=r"bad\.json: invalid JSON at line 2 column"):
        load_llava_json(bad)
    bad_l = tmp_path / "bad.jsonl"
    good_line = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    bad_l.write_text(good_line + "\n{oops\n")
    with pytest.raises(LlavaFormatError, match=r"bad\.jsonl: invalid JSON at line 2"):
        load_llava_json(bad_l)
    obj = write_json(tmp_path / "obj.json", {"not": "a list"})
    with pytest.raises(LlavaFormatError, match="expected a JSON list"):
        load_llava_json(obj)


def test_invalid_samples_named(tmp_path):
    ok = {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    samples = [
        ok,
        {"id": "no-conv", "image": "x.png"},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"conversations": [{"from": "robot", "value": "q"}]},
        {"id": "tags", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]},
    ]
    path = write_json(tmp_path / "d.json", samples)
    with pytest.raises(LlavaFormatError) as info:
        load_llava_json(path, strict=True)
    msg = str(info.value)
    assert "4 invalid sample(s)" in msg and "d.json" in msg
    assert 'sample 1 (id=no-conv): missing_conversations: missing "conversations"' in msg
    assert "sample 2 (id=roles): role_order" in msg and 'expected "from": "human"' in msg
    assert "sample 3 (id=#3): unknown_role" in msg
    assert "sample 4 (id=tags): image_tag_mismatch" in msg and "no \"image\" field" in msg
    # by default the bad samples are dropped and counted, by kind
    assert load_llava_json(path) == [ok]
    scan = scan_llava(path)
    assert scan.total == 5 and scan.samples == [ok] and scan.text_only == 1
    assert scan.by_kind() == {"missing_conversations": 1, "role_order": 1, "unknown_role": 1, "image_tag_mismatch": 1}
    assert "4 skipped" in scan.summary() and "role_order 1 (e.g. roles)" in scan.summary()
    assert load_llava_json(write_json(tmp_path / "ok.json", [ok])) == [ok]
    (tmp_path / "ok.jsonl").write_text(json.dumps(ok) + "\n\n" + json.dumps(ok) + "\n")
    assert load_llava_json(tmp_path / "ok.jsonl") == [ok, ok]


# ------------------------------------------------------------------------------------ images, skipping
def _dataset_files(tmp_path):
    write_image(tmp_path / "images" / "red.png", (255, 0, 0), size=12)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    samples = [
        {"id": "good", "image": "images/red.png", "conversations": conv},
        {"id": "missing", "image": "images/nope.png", "conversations": conv},
        {"id": "corrupt", "image": "images/corrupt.png", "conversations": conv},
        {"id": "text", "conversations": [{"from": "human", "value": "color?"}, {"from": "gpt", "value": "red"}]},
    ]
    return write_json(tmp_path / "train.json", samples)


def test_read_image_rgb_resized(tmp_path):
    from PIL import Image

    Image.new("L", (10, 7), 200).save(tmp_path / "gray.png")
    Image.new("RGBA", (5, 5), (0, 255, 0, 10)).save(tmp_path / "rgba.png")
    g = read_image(tmp_path / "gray.png", 16)
    assert g.dtype == torch.uint8 and g.shape == (3, 16, 16) and (g == 200).all()
    r = read_image(tmp_path / "rgba.png", 8)
    assert r.shape == (3, 8, 8) and r[1].eq(255).all() and r[0].eq(0).all()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path, tok, caplog, num_workers):
    path = _dataset_files(tmp_path)
    ds = LlavaDataset.from_json(path, ConversationEncoder(tok, "chat"), image_size=16)
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers,
                        collate_fn=Collator(tok.pad_token_id, image_size=16))
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
        for b in batches:
            counter.update(b)
    (batch,) = batches
    assert batch["ids"] == ["good", "text"] and batch["indices"] == [0, 3]
    assert batch["images"].shape == (2, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert batch["has_image"].tolist() == [True, False]
    assert batch["images"][0, 0].eq(255).all() and batch["images"][1].eq(0).all()  # text-only: zero image
    assert {(s.id, s.reason) for s in batch["skipped"]} == {("missing", "missing_image"), ("corrupt", "bad_image")}
    assert counter.total == 2 and counter.by_reason == {"missing_image": 1, "bad_image": 1}
    assert "2 so far" in caplog.text


def test_check_images_up_front(tmp_path):
    path = _dataset_files(tmp_path)
    samples = load_llava_json(path)
    kept, dropped = check_images(samples, tmp_path)
    assert [s["id"] for s in kept] == ["good", "corrupt", "text"] and [d.id for d in dropped] == ["missing"]
    kept, dropped = check_images(samples, tmp_path, decode=True)
    assert [s["id"] for s in kept] == ["good", "text"] and {d.reason for d in dropped} == {"missing_image", "bad_image"}


# ------------------------------------------------------------------------------------ collation
def test_collator_padding_sides():
    items = [
        {"input_ids": torch.tensor([5, IMAGE_TOKEN_INDEX, 6]), "labels": torch.tensor([-100, -100, 6]),
         "image": torch.zeros(3, 4, 4, dtype=torch.uint8), "has_image": True, "id": "a", "index": 0},
        {"input_ids": torch.tensor([7]), "labels": torch.tensor([7]),
         "image": torch.ones(3, 4, 4, dtype=torch.uint8), "has_image": False, "id": "b", "index": 1},
        Skipped(2, "c", "bad_image"),
    ]
    right = Collator(pad_token_id=0)(items)
    assert right["input_ids"].tolist() == [[5, IMAGE_TOKEN_INDEX, 6], [7, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, -100, 6], [7, -100, -100]]
    left = Collator(pad_token_id=0, padding_side="left")(items)
    assert left["input_ids"].tolist() == [[5, IMAGE_TOKEN_INDEX, 6], [0, 0, 7]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert len(right["skipped"]) == 1
    empty = Collator(pad_token_id=0, image_size=4)([items[2]])
    assert empty["input_ids"].shape[0] == 0 and empty["images"].shape == (0, 3, 4, 4)
    assert pad_sequences([torch.tensor([1])], 9, "left").tolist() == [[1]]
