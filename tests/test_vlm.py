"""movekd.vlm: placeholder expansion, loss, generation, save/load, projectors."""

from __future__ import annotations

import pytest
import torch
from tiny_vlm import TinyVision, make_llm, make_tokenizer

from movekd.data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Collator, ConversationEncoder
from movekd.vlm import MoveKDVLM, build_projector, load_tokenizer, load_vlm, merge_image_tokens, read_config, save_vlm

IMG = 16  # image side; TinyVision(patch=8) gives N = 4 tokens


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_vlm(tok, seed=0):
    torch.manual_seed(seed)
    vision = TinyVision(dim=16, patch=8)
    return MoveKDVLM(vision, build_projector("mlp2x_gelu", 16, 32), make_llm(len(tok), hidden=32, seed=seed))


def make_batch(tok, padding_side="right", prompt=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = ConversationEncoder(tok, "chat")
    convs = [
        ([{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}], True),
        ([{"from": "human", "value": "What color is the shape in the image?"}, {"from": "gpt", "value": "red"}], False),
        ([{"from": "human", "value": "<image>\ncolor?"}, {"from": "gpt", "value": "blue"},
          {"from": "human", "value": "shape?"}, {"from": "gpt", "value": "triangle"}], True),
    ]
    items = []
    for i, (conv, has_image) in enumerate(convs):
        e = enc.encode_prompt(conv, has_image) if prompt else enc.encode(conv, has_image)
        image = torch.randint(0, 256, (3, IMG, IMG), generator=g, dtype=torch.uint8) if has_image else \
            torch.zeros(3, IMG, IMG, dtype=torch.uint8)
        items.append({"input_ids": e.input_ids, "labels": e.labels, "image": image, "has_image": has_image,
                      "id": str(i), "index": i})
    return Collator(tok.pad_token_id, padding_side)(items), items


def reference_merge(text_embeds, input_ids, attention_mask, labels, image_embeds):
    """Per-sample loop in the style of LLaVA's prepare_inputs_labels_for_multimodal (no padding kept)."""
    out = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, emb, lab = input_ids[b][keep], text_embeds[b][keep], labels[b][keep]
        e_parts, l_parts = [], []
        for j in range(len(ids)):
            if ids[j] == IMAGE_TOKEN_INDEX:
                e_parts.append(image_embeds[b])
                l_parts.append(torch.full((image_embeds.shape[1],), IGNORE_INDEX))
            else:
                e_parts.append(emb[j: j + 1])
                l_parts.append(lab[j: j + 1])
        out.append((torch.cat(e_parts), torch.cat(l_parts)))
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_merge_image_tokens_places_images(padding_side):
    B, L, D, N = 3, 6, 5, 4
    P = IMAGE_TOKEN_INDEX
    # Sample 0: one placeholder; 1: none (text-only, shorter); 2: two placeholders.
    rows = [[11, P, 12, 13, 14], [21, 22, 23], [31, P, 32, P, 33, 34]]
    input_ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(L - len(r), L)
        input_ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    labels = torch.where(mask.bool() & (input_ids != P), input_ids + 100, torch.full_like(input_ids, IGNORE_INDEX))
    text = input_ids.float().unsqueeze(-1).expand(B, L, D).clone()
    images = torch.arange(B * N * D, dtype=torch.float).view(B, N, D) + 1000
    embeds, new_mask, pos, new_labels = merge_image_tokens(text, input_ids, mask, labels, images)
    assert embeds.shape == (B, L + 2 * (N - 1), D)
    for b, (ref_e, ref_l) in enumerate(reference_merge(text, input_ids, mask, labels, images)):
        keep = new_mask[b].bool()
        n = len(ref_l)
        assert keep.sum() == n
        assert torch.equal(embeds[b][keep], ref_e) and torch.equal(new_labels[b][keep], ref_l)
        assert torch.equal(pos[b][keep], torch.arange(n))  # positions restart at 0 whatever the padding
        real = torch.nonzero(keep).squeeze(1)  # contiguous block at the padding side's opposite end
        assert real.tolist() == list(range(real[0], real[0] + n))
        if padding_side == "right":
            assert real[0] == 0
        else:
            assert real[-1] == embeds.shape[1] - 1
    # Sample 0, right padding: the image occupies positions 1..4 exactly.
    if padding_side == "right":
        assert torch.equal(embeds[0, 1:1 + N], images[0]) and (new_labels[0, 1:1 + N] == IGNORE_INDEX).all()
        assert new_labels[0, 0] == 111 and new_labels[0, 1 + N] == 112


def test_forward_batched_equals_per_sample(tok):
    vlm = make_vlm(tok).double()
    batch, items = make_batch(tok)
    out = vlm(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert out.vision.tokens.shape == (3, 4, 16)
    assert out.labels.shape == out.attention_mask.shape == out.logits.shape[:2]
    for b, it in enumerate(items):
        single = vlm(it["image"][None], it["input_ids"][None])
        keep = out.attention_mask[b].bool()
        assert torch.allclose(out.logits[b][keep], single.logits[0], atol=1e-9)


def test_loss_finite_grads_reach_vision_and_overfits(tok):
    vlm = make_vlm(tok).train()
    batch, _ = make_batch(tok)
    opt = torch.optim.Adam(vlm.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        out = vlm(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for name, p in list(vlm.vision.named_parameters()) + list(vlm.projector.named_parameters()):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_text_only_batch_keeps_vision_in_graph(tok):
    vlm = make_vlm(tok)
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]
    enc = ConversationEncoder(tok, "chat").encode(conv, has_image=False)
    out = vlm(torch.zeros(1, 3, IMG, IMG, dtype=torch.uint8), enc.input_ids[None], labels=enc.labels[None])
    out.loss.backward()
    assert all(p.grad is not None for p in vlm.projector.parameters())  # zero, but present (DDP-safe)


def _greedy_stepwise(vlm, image, ids, max_new, eos):
    out = []
    for _ in range(max_new):
        logits = vlm(image, ids).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_generate_matches_stepwise_greedy(tok):
    vlm = make_vlm(tok, seed=1).double().eval()
    batch, items = make_batch(tok, padding_side="left", prompt=True)
    assert batch["attention_mask"][:, 0].eq(0).any()  # really left-padded, with unequal image counts
    max_new = 6
    gen = vlm.generate(batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for b, it in enumerate(items):
        ref = _greedy_stepwise(vlm, it["image"][None], it["input_ids"][None], max_new, tok.eos_token_id)
        got = gen[b].tolist()
        assert got[: len(ref)] == ref
        assert all(t == tok.pad_token_id for t in got[len(ref):])


def test_save_load_identical_logits(tok, tmp_path):
    vlm = make_vlm(tok).eval()
    batch, _ = make_batch(tok)
    with torch.no_grad():
        before = vlm(batch["images"], batch["input_ids"], batch["attention_mask"]).logits
    path = save_vlm(vlm, tmp_path / "bundle", tokenizer=tok, extra={"image_size": IMG})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp folder left
    names = {p.name for p in path.iterdir()}
    assert {"movekd_config.json", "vision.safetensors", "projector.safetensors", "llm"} <= names
    with pytest.raises(FileExistsError):
        save_vlm(vlm, path)
    save_vlm(vlm, path, tokenizer=tok, extra={"image_size": IMG}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

    cfg = read_config(path)
    assert cfg["vision"] == {"dim": 16, "patch": 8} and cfg["projector"]["type"] == "mlp2x_gelu"
    assert cfg["extra"] == {"image_size": IMG}
    loaded = load_vlm(path, build_vision=lambda c: TinyVision(**c))
    with torch.no_grad():
        after = loaded(batch["images"], batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(before, after)
    assert load_tokenizer(path)("red circle")["input_ids"] == tok("red circle")["input_ids"]
    assert (path / "llm" / "model.safetensors").is_file()  # the LLM folder stays plain HF


def test_failed_save_leaves_nothing(tok, tmp_path, monkeypatch):
    vlm = make_vlm(tok)
    vlm.vision_config = {"not json": object()}
    with pytest.raises(TypeError):
        save_vlm(vlm, tmp_path / "a")
    vlm.vision_config = {}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vlm.llm, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_vlm(vlm, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_bf16_forward(tok):
    vlm = make_vlm(tok).to(torch.bfloat16)
    batch, _ = make_batch(tok)
    out = vlm(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_projectors():
    p = build_projector("mlp2x_gelu", 8, 12)
    assert [type(m).__name__ for m in p] == ["Linear", "GELU", "Linear"]
    assert set(p.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # LLaVA mm_projector keys
    assert p(torch.randn(2, 3, 8)).shape == (2, 3, 12)
    assert len(build_projector("mlp3x_gelu", 8, 12)) == 5
    assert build_projector("linear", 8, 12).config == {"type": "linear", "in_dim": 8, "out_dim": 12}
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("qformer", 8, 12)


def test_supervised_logits_only_gives_the_same_loss_and_gradients(tok):
    vlm = make_vlm(tok).double()
    batch, _ = make_batch(tok)
    args = (batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    full = vlm(*args)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}
    vlm.zero_grad()
    sparse = vlm(*args, supervised_logits_only=True)
    assert sparse.logits is None
    torch.testing.assert_close(sparse.loss, full.loss)
    sparse.loss.backward()
    for n, p in vlm.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)
