"""LLaVA-format JSON datasets: loading, validation, and a map-style ``Dataset``.

File format (LLaVA's ``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``; ``.jsonl`` also
accepted, one sample per line)::

    [{"id": "...", "image": "images/train/12.png",          # optional: text-only samples have none
      "conversations": [{"from": "human", "value": "<image>\\nWhat shape?"},
                        {"from": "gpt", "value": "circle"}, ...]}]

Structural problems (bad JSON, missing ``conversations``, wrong roles, a stray ``<image>`` tag) are
data bugs and raise :class:`LlavaFormatError` when the file is loaded, naming the file, the position
or the sample index and id. Every bad sample is listed (up to 5) with the total count.

Missing or corrupt image files are *not* errors: one bad file among 600k must not kill an epoch.
Chosen policy: ``LlavaDataset.__getitem__`` returns a :class:`Skipped` marker for such a sample (and
for one that cannot be encoded, e.g. too long); the collator drops it and reports it in the batch
(``batch["skipped"]``), so the count survives DataLoader worker processes; :class:`SkipCounter`
(main process) adds the counts up and logs them. Optionally, :func:`check_images` filters the
samples up front (existence, or a full decode) and returns what it dropped.

Images are decoded with PIL in the worker, converted to RGB, brought to a fixed square
``image_size`` by ``image_aspect_ratio`` (stretch, LLaVA's centre crop ``square`` or mean-colour
``pad``: :mod:`movekd.data.images`; the model's own preprocessing does the rest) and returned as
``uint8 [3, H, W]``. A text-only sample gets a zero image and ``has_image=False``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from movekd.data import shared_prefix
from movekd.data.images import IMAGE_ASPECT_RATIOS, prepare_image
from movekd.data.templates import IMAGE_TAG, ROLE_MAP, ConversationEncoder, EncodingError

logger = logging.getLogger(__name__)

_SHOWN_ERRORS = 5


class LlavaFormatError(ValueError):
    """A LLaVA JSON file or sample with the wrong structure."""


@dataclass(frozen=True)
class Skipped:
    """Marker returned by :class:`LlavaDataset` for a sample that cannot be used this time."""

    index: int
    id: str
    reason: str  # "missing_image" | "bad_image" | "encoding"
    detail: str = ""


# ------------------------------------------------------------------------------------------ loading
def load_llava_json(path: str | os.PathLike, *, require_answer: bool = True) -> list[dict]:
    """Read and validate a LLaVA-format ``.json`` (a list) or ``.jsonl`` file.

    Raises :class:`LlavaFormatError` on malformed JSON (with file, line, column) or bad samples.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        samples = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise LlavaFormatError(
                        f"{path}: invalid JSON at line {lineno} column {err.colno}: {err.msg}") from None
    else:
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as err:
            raise LlavaFormatError(
                f"{path}: invalid JSON at line {err.lineno} column {err.colno} (char {err.pos}): {err.msg}"
            ) from None
        if not isinstance(samples, list):
            raise LlavaFormatError(f"{path}: expected a JSON list of samples, got {type(samples).__name__}")
    validate_samples(samples, source=str(path), require_answer=require_answer)
    return samples


def sample_id(sample, index: int) -> str:
    return str(sample.get("id", f"#{index}")) if isinstance(sample, dict) else f"#{index}"


def _sample_problem(sample, require_answer: bool) -> str | None:
    """The first structural problem of one sample, or None."""
    if not isinstance(sample, dict):
        return f"expected an object, got {type(sample).__name__}"
    conv = sample.get("conversations")
    if conv is None:
        return 'missing "conversations"'
    if not isinstance(conv, list) or not conv:
        return '"conversations" must be a non-empty list'
    expected = "user"
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f'turn {t}: expected {{"from": ..., "value": str}}'
        role = ROLE_MAP.get(turn.get("from"))
        if role is None:
            return f'turn {t}: unknown role "from": {turn.get("from")!r} (expected human, gpt or system)'
        if role == "system":
            if t != 0:
                return f"turn {t}: a system turn is only allowed first"
            continue
        if role != expected:
            want = "human" if expected == "user" else "gpt"
            return f'turn {t}: expected "from": "{want}", got {turn["from"]!r} (turns must alternate human, gpt)'
        expected = "assistant" if role == "user" else "user"
    if require_answer and not any(ROLE_MAP[turn["from"]] == "assistant" for turn in conv):
        return "no gpt turn (nothing to learn from)"
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv)
    image = sample.get("image")
    if image is None:
        if tags:
            return f'{tags} "<image>" tag(s) but no "image" field'
    elif not isinstance(image, str):
        return '"image" must be a single path (multi-image samples are not supported)'
    elif tags > 1:
        return f'{tags} "<image>" tags for one image'
    return None


def validate_samples(samples: list, *, source: str = "<samples>", require_answer: bool = True) -> None:
    """Raise :class:`LlavaFormatError` listing the bad samples (index and id) of a loaded list."""
    problems = []
    for i, s in enumerate(samples):
        problem = _sample_problem(s, require_answer)
        if problem is not None:
            problems.append(f"sample {i} (id={sample_id(s, i)}): {problem}")
    if problems:
        shown = "\n  ".join(problems[:_SHOWN_ERRORS])
        more = f"\n  ... and {len(problems) - _SHOWN_ERRORS} more" if len(problems) > _SHOWN_ERRORS else ""
        raise LlavaFormatError(f"{source}: {len(problems)} invalid sample(s):\n  {shown}{more}")


# ------------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike, size: int, image_aspect_ratio: str = "stretch",
               fill: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """Decode with PIL, convert to RGB, bring to ``size × size`` by ``image_aspect_ratio`` (stretch,
    square or pad with ``fill``: :func:`movekd.data.images.prepare_image`) → ``uint8 [3, size, size]``."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    return prepare_image(img, image_aspect_ratio, fill, size)


def resolve_image(sample: dict, image_root: str | os.PathLike) -> Path:
    return Path(image_root) / sample["image"]  # an absolute "image" path wins in the join


def check_images(samples: list[dict], image_root: str | os.PathLike, *, decode: bool = False
                 ) -> tuple[list[dict], list[Skipped]]:
    """Up-front image check: keep samples whose image exists (and decodes, if ``decode``).

    Returns ``(kept, dropped)``; the dropped count is logged. Text-only samples are kept.
    """
    from PIL import Image

    kept, dropped = [], []
    for i, s in enumerate(samples):
        if s.get("image") is not None:
            path = resolve_image(s, image_root)
            if not path.is_file():
                dropped.append(Skipped(i, sample_id(s, i), "missing_image", str(path)))
                continue
            if decode:
                try:
                    with Image.open(path) as img:
                        img.convert("RGB")
                except Exception as err:  # PIL raises many types for bad files
                    dropped.append(Skipped(i, sample_id(s, i), "bad_image", f"{path}: {err}"))
                    continue
        kept.append(s)
    if dropped:
        logger.warning("check_images: dropped %d of %d samples (first: %s)", len(dropped), len(samples), dropped[0])
    return kept, dropped


# ------------------------------------------------------------------------------------------ dataset
class LlavaDataset(Dataset):
    """Map-style dataset over validated LLaVA samples.

    ``__getitem__`` returns a dict ``{"input_ids", "labels", "image", "has_image", "id", "index"}``
    (``labels`` is None with ``prompt_only``) or a :class:`Skipped` marker; use
    :class:`movekd.data.collate.Collator` to batch.

    With ``group_by_image`` an item is one image with all its samples' questions in one
    shared-prefix sequence (:mod:`movekd.data.shared_prefix`); the item then also has
    ``segment_ids`` and ``num_questions``, and ``len()`` counts images (groups), not samples.

    Args:
        samples: validated samples (see :func:`load_llava_json`).
        encoder: the :class:`ConversationEncoder` (tokenizer + template + max_length).
        image_root: folder image paths are relative to.
        image_size: side of the square resize.
        prompt_only: encode the prompt for generation (drops a trailing gpt turn) instead of labels.
        group_by_image: one item per image, its questions sharing the image and prompt prefix.
        max_questions_per_image: split larger groups into chunks of this many questions.
        image_aspect_ratio: ``"stretch"``, ``"square"`` or ``"pad"`` (:mod:`movekd.data.images`).
        fill: the ``pad`` colour, 0..255 (LLaVA: the student processor's mean).
    """

    def __init__(self, samples: list[dict], encoder: ConversationEncoder, *, image_root: str | os.PathLike = ".",
                 image_size: int = 224, prompt_only: bool = False, group_by_image: bool = False,
                 max_questions_per_image: int | None = None, image_aspect_ratio: str = "stretch",
                 fill: tuple[int, int, int] = (0, 0, 0)):
        if group_by_image and prompt_only:
            raise ValueError("group_by_image is for training; prompts for generation are one per sample")
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; expected one of "
                             f"{', '.join(IMAGE_ASPECT_RATIOS)}")
        self.image_aspect_ratio = image_aspect_ratio
        self.fill = tuple(fill)
        self.samples = samples
        self.groups = shared_prefix.group_by_image(samples, max_questions_per_image) if group_by_image else None
        self.encoder = encoder
        self.image_root = Path(image_root)
        self.image_size = image_size
        self.prompt_only = prompt_only
        self.num_skipped = 0  # in this process only; see SkipCounter for the DataLoader-wide count

    @classmethod
    def from_json(cls, path: str | os.PathLike, encoder: ConversationEncoder, *, image_root=None,
                  image_size: int = 224, prompt_only: bool = False, check: bool | str = False) -> LlavaDataset:
        """Load ``path``; images are relative to ``image_root`` (default: the file's folder).

        ``check``: False (skip bad images lazily), ``"exists"`` or ``"decode"`` (filter up front).
        """
        samples = load_llava_json(path, require_answer=not prompt_only)
        root = Path(path).parent if image_root is None else Path(image_root)
        if check:
            samples, _ = check_images(samples, root, decode=check == "decode")
        return cls(samples, encoder, image_root=root, image_size=image_size, prompt_only=prompt_only)

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.samples)

    def sample(self, index: int) -> dict:
        """The (first) sample of item ``index``: its image is the item's image."""
        return self.samples[self.groups[index][0] if self.groups is not None else index]

    def _skip(self, index, sample, reason, detail) -> Skipped:
        self.num_skipped += 1
        skipped = Skipped(index, sample_id(sample, index), reason, detail)
        # The first few skips, then every 1000th, at WARNING (SkipCounter gives the DataLoader-wide tally).
        level = logging.WARNING if self.num_skipped <= 10 or self.num_skipped % 1000 == 0 else logging.DEBUG
        logger.log(level, "skipping sample %d (id=%s): %s: %s [%d skipped in this process]",
                   index, skipped.id, reason, detail, self.num_skipped)
        return skipped

    def __getitem__(self, index: int) -> dict | Skipped:
        sample = self.sample(index)
        has_image = sample.get("image") is not None
        extra = {}
        try:
            if self.groups is not None and len(self.groups[index]) > 1:
                members = [self.encoder.encode(self.samples[i]["conversations"], has_image)
                           for i in self.groups[index]]
                enc, segment_ids, kept = shared_prefix.merge_shared_prefix(
                    members, max_length=self.encoder.max_length, num_image_tokens=self.encoder.num_image_tokens)
                extra = {"segment_ids": segment_ids, "num_questions": kept}
            else:
                encode = self.encoder.encode_prompt if self.prompt_only else self.encoder.encode
                enc = encode(sample["conversations"], has_image)
        except EncodingError as err:
            return self._skip(index, sample, "encoding", str(err))
        if has_image:
            path = resolve_image(sample, self.image_root)
            if not path.is_file():
                return self._skip(index, sample, "missing_image", str(path))
            try:
                image = read_image(path, self.image_size, self.image_aspect_ratio, self.fill)
            except Exception as err:  # PIL raises many types for truncated / non-image files
                return self._skip(index, sample, "bad_image", f"{path}: {type(err).__name__}: {err}")
        else:
            image = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return {"input_ids": enc.input_ids, "labels": enc.labels, "image": image, "has_image": has_image,
                "id": sample_id(sample, index), "index": index, **extra}

    def modality_lengths(self) -> list[int]:
        """LLaVA's length proxy per item for ``group_by_modality_length``: the words of every turn
        (``str.split``, no tokenising), positive for an item with an image, negative without; a
        shared-prefix item sums its samples. Never 0 (the sign carries the modality)."""
        lengths = []
        for index in range(len(self)):
            members = self.groups[index] if self.groups is not None else [index]
            words = sum(len(turn["value"].split()) for i in members for turn in self.samples[i]["conversations"])
            lengths.append(max(1, words) if self.sample(index).get("image") is not None else -max(1, words))
        return lengths
