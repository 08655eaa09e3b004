"""easy-vqa (package ``easy-vqa``) → LLaVA-format JSON + an image folder.

Writes, inside the asset folder:
- ``images/{train,test}/{id}.png``: the 64×64 PNGs (4,000 train, 1,000 test);
- ``train.json`` / ``test.json``: one sample per question (38,575 / 9,673), in LLaVA format
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
  plus ``"type"`` (``yes/no``, ``shape`` or ``color``) for per-type accuracy;
- ``pretrain.json``: one caption per train image ("a blue rectangle"), for stage 1 (LLaVA's
  pretraining uses image–caption pairs; easy-vqa has none, so they are built from its answers);
- ``train_rationale.json``: ``train.json`` with every yes/no answer preceded by a short rationale,
  "a blue rectangle; not red: yes" (:func:`rationale_answer`), for the demo's stage 2: the model says
  what it sees and restates what the question asks about, then answers (README "The demo": why).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from movekd.assets.packages import package_dir

DISTRIBUTION = "easy-vqa"
IMAGE_TOKEN = "<image>"
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
# Stage-1 instruction; the `plain` template drops it (only the caption is supervised), as in LLaVA.
CAPTION_PROMPT = "Describe the image briefly."


def question_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    return "color"


def _questions(root: Path, split: str) -> list[tuple[str, str, int]]:
    rows = json.loads((root / "data" / split / "questions.json").read_text())
    return [(str(q), str(a), int(i)) for q, a, i in rows]


def _vqa_samples(split: str, questions: list[tuple[str, str, int]]) -> list[dict]:
    return [
        {
            "id": f"{split}-{index}",
            "image": f"images/{split}/{image_id}.png",
            "type": question_type(answer),
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for index, (question, answer, image_id) in enumerate(questions)
    ]


def _facts(question: str, answer: str) -> tuple[str, str, bool] | None:
    """(kind, word, holds) stated by one Q/A, e.g. ("shape", "circle", True); None if it states none."""
    kind = question_type(answer)
    if kind != "yes/no":
        return kind, answer, True
    asked = _asked(question)
    if asked is None:
        return None
    word, negated = asked
    return ("shape" if word in SHAPES else "color"), word, (answer == "yes") != negated


def _asked(question: str) -> tuple[str, bool] | None:
    """The shape or colour a yes/no question asks about, and whether it is negated; None if it names none."""
    words = question.rstrip("?").split()
    # easy-vqa negates with "not" ("is there not a red shape?") and with "no" ("is no red shape
    # present?"): either flips the answer (asset version 1 missed "no"; see ASSETS).
    negated = "not" in words or "no" in words
    return next(((w, negated) for w in words if w in SHAPES or w in COLOURS), None)


def image_labels(questions: list[tuple[str, str, int]]) -> dict[int, tuple[str | None, str | None]]:
    """``(colour, shape)`` per image id from what its questions state (None where they leave it open).

    Every easy-vqa image holds one shape of one colour. Direct answers ("what color is the shape?")
    and yes/no questions ("is there not a circle?" → "no") both state facts; a shape ruled out twice
    leaves the third one (a colour ruled out seven times, the eighth).
    """
    found: dict[int, dict[str, Counter]] = {}
    excluded: dict[int, set[str]] = {}
    for question, answer, image_id in questions:
        fact = _facts(question, answer)
        if fact is None:
            continue
        kind, word, holds = fact
        if holds:
            found.setdefault(image_id, {}).setdefault(kind, Counter())[word] += 1
        else:
            excluded.setdefault(image_id, set()).add(word)
    result = {}
    for image_id in sorted(set(found) | set(excluded)):
        facts = found.get(image_id, {})
        ruled_out = excluded.get(image_id, set())
        result[image_id] = tuple(_label(facts.get(kind), ruled_out, words)
                                 for kind, words in (("color", COLOURS), ("shape", SHAPES)))
    return result


def _label(stated: Counter | None, ruled_out: set[str], words: tuple[str, ...]) -> str | None:
    """The one word stated to hold, else the one word not ruled out, else None."""
    if stated:
        return stated.most_common(1)[0][0]
    remaining = [w for w in words if w not in ruled_out]
    return remaining[0] if len(remaining) == 1 else None


def captions(questions: list[tuple[str, str, int]]) -> dict[int, str]:
    """One caption per image ("a blue rectangle") from :func:`image_labels`.

    An image whose colour stays unknown is captioned "a circle", one whose shape stays unknown
    "a blue shape", and one with neither none.
    """
    return {image_id: "a " + " ".join(w for w in (colour, shape or "shape") if w)
            for image_id, (colour, shape) in image_labels(questions).items() if colour or shape}


def rationale_answer(question: str, answer: str, caption: str | None) -> str:
    """A yes/no ``answer`` preceded by what the image shows and what ``question`` asks about.

    ``rationale_answer("is there not a red shape?", "yes", "a blue circle")`` is
    ``"a blue circle; not red: yes"``. The restated word after the caption is the point: SmolLM2 with
    LoRA learns to compare a word with the same word *earlier* in its context within 80 steps, but not
    a word with a caption that follows it (text-only runs in the README). Scored by the last word
    (``eval.answer_word: last``). Other answers are returned unchanged; ``caption`` None (an image
    whose questions state neither colour nor shape) reads "a shape".
    """
    if question_type(answer) != "yes/no":
        return answer
    asked = _asked(question)
    if asked is None:
        raise ValueError(f"easy-vqa yes/no question names no shape or colour: {question!r}")
    word, negated = asked
    return f"{caption or 'a shape'}; {'not ' if negated else ''}{word}: {answer}"


def _rationale_samples(samples: list[dict], questions: list[tuple[str, str, int]],
                       image_captions: dict[int, str]) -> list[dict]:
    out = []
    for sample, (question, answer, image_id) in zip(samples, questions):
        human, gpt = sample["conversations"]
        reply = rationale_answer(question, answer, image_captions.get(image_id))
        out.append({**sample, "conversations": [human, {**gpt, "value": reply}]})
    return out


def build_easyvqa(out: Path) -> dict:
    """Write the LLaVA-format easy-vqa dataset into ``out``."""
    root = package_dir("easy_vqa", DISTRIBUTION)
    out = Path(out)
    counts = {}
    for split in ("train", "test"):
        shutil.copytree(root / "data" / split / "images", out / "images" / split)
        questions = _questions(root, split)
        samples = _vqa_samples(split, questions)
        (out / f"{split}.json").write_text(json.dumps(samples))
        counts[f"{split}_questions"] = len(samples)
        counts[f"{split}_images"] = len(list((out / "images" / split).glob("*.png")))
        if split == "train":
            image_captions = captions(questions)
            rationale = _rationale_samples(samples, questions, image_captions)
            (out / "train_rationale.json").write_text(json.dumps(rationale))
            pretrain = [
                {
                    "id": f"caption-{image_id}",
                    "image": f"images/train/{image_id}.png",
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
                        {"from": "gpt", "value": caption},
                    ],
                }
                for image_id, caption in image_captions.items()
            ]
            (out / "pretrain.json").write_text(json.dumps(pretrain))
            counts["pretrain_captions"] = len(pretrain)
    return {"source": f"{DISTRIBUTION} (MIT)", **counts}
