"""movekd.eval.vqa: normalisation, answer-prior baseline, batched exact-match evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from tiny_vlm import TinyVision, make_llm, make_tokenizer, write_image

from movekd.data import Collator, ConversationEncoder, LlavaDataset, pad_sequences
from movekd.eval import answer_prior_baseline, evaluate_vqa, normalize_answer
from movekd.vlm import MoveKDVLM, build_projector

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def qa(i, question, answer, qtype=None, image=None):
    s = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                         {"from": "gpt", "value": answer}]}
    if image:
        s["image"] = image
    if qtype:
        s["type"] = qtype
    return s


def test_normalize_answer():
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("  Circle!\nmore text") == "circle"
    assert normalize_answer("\n\nred, I think") == "red"
    assert normalize_answer("The answer is yes") == "the"  # strict: no containment matching
    assert normalize_answer("Dark  Blue.", word="all") == "dark blue"
    assert normalize_answer("...") == "" and normalize_answer("") == ""
    # "last": the answer that ends a rationale (the demo's yes/no answers); a plain answer is its own last word
    assert normalize_answer("a blue circle; not red: Yes.", word="last") == "yes"
    assert normalize_answer("Circle\nthen more", word="last") == "circle"
    with pytest.raises(ValueError, match="'middle'"):
        normalize_answer("yes", word="middle")


def test_evaluate_vqa_scores_the_answer_after_a_rationale(tok, tmp_path):
    write_image(tmp_path / "a.png")
    samples = [qa(0, "is there not a red shape?", "yes", "yes/no", "a.png"),
               qa(1, "what color is the shape?", "blue", "color", "a.png")]
    oracle = OracleVLM(tok, {"red shape?": "a blue circle; not red: yes", "color is": "blue"})
    first = evaluate_vqa(oracle, tok, samples, image_root=tmp_path, image_size=8, max_new_tokens=16)
    last = evaluate_vqa(oracle, tok, samples, image_root=tmp_path, image_size=8, max_new_tokens=16, word="last")
    assert first["per_type"]["yes/no"]["correct"] == 0 and last["per_type"]["yes/no"]["correct"] == 1
    assert first["per_type"]["color"]["correct"] == last["per_type"]["color"]["correct"] == 1


def test_the_bundle_says_which_word_to_score(tok, tmp_path):
    """A training config's eval.answer_word goes into the bundle's VLMConfig; run_eval uses it unless
    its own config sets one."""
    import json

    from movekd.inference import LoadedVLM
    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import run_eval
    from movekd.vlm.config import ProjectorConfig, VLMConfig, settings_from_train_config

    assert settings_from_train_config({"eval": {"answer_word": "last"}})["answer_word"] == "last"
    assert settings_from_train_config({"stages": [{}]})["answer_word"] == "first"  # no eval section
    write_image(tmp_path / "a.png")
    samples = [qa(0, "is there not a red shape?", "yes", "yes/no", "a.png")]
    (tmp_path / "test.json").write_text(json.dumps(samples))
    oracle = OracleVLM(tok, {"red shape?": "a blue circle; not red: yes"})
    config = VLMConfig(vision={}, projector=ProjectorConfig("mlp2x_gelu", 8, 8), image_size=8, answer_word="last")
    assert VLMConfig.from_dict(config.to_dict()).answer_word == "last"
    loaded = LoadedVLM(oracle, tok, config)
    assert run_eval(loaded, EvalConfig(data=str(tmp_path / "test.json"), max_new_tokens=16,
                                       share_image_prefix=False))["accuracy"] == 1.0
    assert run_eval(loaded, EvalConfig(data=str(tmp_path / "test.json"), max_new_tokens=16, answer_word="first",
                                       share_image_prefix=False))["accuracy"] == 0.0


def test_answer_prior_baseline():
    train = [qa(0, "q", "yes", "yes/no"), qa(1, "q", "yes", "yes/no"), qa(2, "q", "no", "yes/no"),
             qa(3, "q", "circle", "shape"), qa(4, "q", "circle", "shape"), qa(5, "q", "red", "color")]
    test = [qa(10, "q", "yes", "yes/no"), qa(11, "q", "no", "yes/no"), qa(12, "q", "circle", "shape"),
            qa(13, "q", "triangle", "shape"), qa(14, "q", "blue", "color"), qa(15, "q", "red", "color")]
    r = answer_prior_baseline(train, test)
    assert r["prior"] == {"color": "red", "shape": "circle", "yes/no": "yes"}
    assert r["n"] == 6 and r["correct"] == 3 and r["accuracy"] == pytest.approx(0.5)
    assert r["per_type"]["yes/no"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert r["per_type"]["color"]["accuracy"] == 0.5 and r["per_type"]["shape"]["accuracy"] == 0.5
    # Training samples without "type" get it from their answer (as typed in the test set).
    untyped = [{k: v for k, v in s.items() if k != "type"} for s in train]
    assert answer_prior_baseline(untyped, test)["prior"] == r["prior"]


class OracleVLM(nn.Module):
    """Answers correctly (with punctuation and capitals) the questions it knows, else "no"."""

    def __init__(self, tok, known: dict[str, str]):
        super().__init__()
        self.tok, self.known = tok, known
        self.anchor = nn.Parameter(torch.zeros(1))
        self.batch_sizes = []

    def generate(self, images, input_ids, attention_mask, *, max_new_tokens, eos_token_id, pad_token_id, **kw):
        assert attention_mask[:, -1].all()  # left padding: every prompt ends at the last column
        self.batch_sizes.append(len(input_ids))
        outs = []
        for row in input_ids:
            prompt = self.tok.decode([t for t in row.tolist() if t >= 0])
            answer = next((a for q, a in self.known.items() if q in prompt), "no")
            outs.append(torch.tensor(self.tok(answer.capitalize() + ".")["input_ids"] + [eos_token_id]))
        return pad_sequences(outs, pad_token_id)


def test_evaluate_vqa_scoring_and_skips(tok, tmp_path):
    write_image(tmp_path / "a.png")
    samples = [
        qa(0, "what shape?", "circle", "shape", "a.png"),
        qa(1, "what color?", "red", "color", "a.png"),
        qa(2, "is there a circle?", "yes", "yes/no", "a.png"),
        qa(3, "is there a triangle?", "no", "yes/no", "missing.png"),  # skipped: counts as wrong
        qa(4, "what colour?", "blue", None, "a.png"),
    ]
    oracle = OracleVLM(tok, {"shape?": "circle", "color?": "green", "a circle?": "yes", "colour?": "blue"})
    r = evaluate_vqa(oracle, tok, samples, image_root=tmp_path, batch_size=2, image_size=8, return_predictions=True)
    assert r["n"] == 5 and r["correct"] == 3 and r["skipped"] == 1
    assert r["per_type"] == {"color": {"accuracy": 0.0, "correct": 0, "n": 1},
                             "shape": {"accuracy": 1.0, "correct": 1, "n": 1},
                             "yes/no": {"accuracy": 0.5, "correct": 1, "n": 2}}
    assert [p["correct"] for p in r["predictions"]] == [True, False, True, False, True]
    assert r["predictions"][0]["prediction"] == "Circle." and r["predictions"][3]["prediction"] is None
    # Batches in prompt-length order (0, 1 | 4, 2 | 3): the last one held only the skipped sample.
    assert oracle.batch_sizes == [2, 2]


def test_eval_order_batches_anyres_images_by_crop_count(tmp_path):
    from PIL import Image

    from movekd.eval.order import length_sorted_order

    pinpoints = [[8, 16], [16, 8], [16, 16], [24, 8], [8, 24]]  # LLaVA-NeXT's grid at an 8-px crop
    sizes = {"wide.png": (8, 24), "square.png": (16, 16), "tall.png": (16, 8)}  # (height, width)
    for name, (h, w) in sizes.items():
        Image.new("RGB", (w, h)).save(tmp_path / name)
    samples = [qa(0, "a long question with many words?", "x", image="square.png"),
               qa(1, "short?", "x", image="square.png"),
               qa(2, "q?", "x", image="wide.png"),      # 1 + 1x3 tiles
               qa(3, "q?", "x", image="missing.png"),   # unreadable: first, the dataset skips it
               qa(4, "q?", "x", image="tall.png")]      # 1 + 2x1 tiles
    order = length_sorted_order(samples, image_root=tmp_path, image_aspect_ratio="anyres",
                                grid_pinpoints=pinpoints, crop_size=8)
    assert order == [3, 4, 2, 1, 0]  # 0, 3, 4, 5 crops; same crops: fewer prompt words first
    plain = length_sorted_order(samples, image_root=tmp_path)
    assert plain == [1, 2, 3, 4, 0]  # not AnyRes: prompt words only (2, 2, 2, 2, 7), ties in file order


def test_overfit_then_evaluate_end_to_end(tok, tmp_path):
    """Train a tiny VLM on 4 coloured images, then evaluate: the labels, the prompt and the generation
    must line up exactly for exact match to reach 100%."""
    samples = []
    for i, name in enumerate(COLORS):
        write_image(tmp_path / "images" / f"{name}.png", COLORS[name])
        samples.append(qa(i, "What color is the shape?", name, "color", f"images/{name}.png"))
    torch.manual_seed(0)
    vlm = MoveKDVLM(TinyVision(dim=16, patch=8), build_projector("mlp2x_gelu", 16, 32), make_llm(len(tok), 32))
    ds = LlavaDataset(samples, ConversationEncoder(tok, "chat"), image_root=tmp_path, image_size=16)
    (batch,) = DataLoader(ds, batch_size=4, collate_fn=Collator(tok.pad_token_id))
    opt = torch.optim.Adam(vlm.parameters(), lr=1e-2)
    vlm.train()
    for _ in range(60):
        loss = vlm(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    r = evaluate_vqa(vlm, tok, samples, image_root=tmp_path, batch_size=3, image_size=16, max_new_tokens=4,
                     return_predictions=True)
    assert r["accuracy"] == 1.0, r["predictions"]
    assert r["per_type"]["color"]["n"] == 4 and vlm.training  # training mode restored
    assert answer_prior_baseline(samples, samples)["accuracy"] == 0.25
