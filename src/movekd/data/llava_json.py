"""LLaVA-format JSON datasets: loading, validation, and a map-style ``Dataset``.

File format (LLaVA's ``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``; ``.jsonl`` also
accepted, one sample per line)::

    [{"id": "...", "image": "images/train/12.png",          # optional: text-only samples have none
      "conversations": [{"from": "human", "value": "<image>\\nWhat shape?"},
                        {"from": "gpt", "value": "circle"}, ...]}]

A file that is not JSON (or not a list) raises :class:`LlavaFormatError` naming the file, line and
column. A bad *sample* is not an error: at LLaVA scale (665K records from five image folders) a few
always are. :func:`scan_llava` opens the file and checks every record before any model is built:
structure (missing or empty ``conversations``, wrong role order, more ``<image>`` tags than images,
...) and, given the image folder, that each image file exists. Bad samples are dropped and counted
by kind (:data:`PROBLEM_KINDS`), with the first ids of each kind in :meth:`DataScan.summary`.
``strict`` refuses the file and lists them instead.

What the scan cannot see, a corrupt image or a conversation that ``max_length`` cuts too short, is
met when the sample is read: ``LlavaDataset.__getitem__`` returns a :class:`Skipped` marker; the
collator drops it and reports it in the batch (``batch["skipped"]``), so the count survives
DataLoader worker processes; :class:`SkipCounter` (main process) adds the counts up.
:func:`check_skip_budget` stops a run when more than ``max_skip_ratio`` of the data is bad.
Optionally, :func:`check_images` filters the samples up front with a full decode.

Images are decoded with PIL in the worker, converted to RGB, brought to a fixed square
``image_size`` by ``image_aspect_ratio`` (stretch, LLaVA's centre crop ``square`` or mean-colour
``pad``: :mod:`movekd.data.images`; the model's own preprocessing does the rest) and returned as
``uint8 [3, H, W]``. A text-only sample gets a zero image and ``has_image=False``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from movekd.data import shared_prefix
from movekd.data.images import IMAGE_ASPECT_RATIOS, prepare_image
from movekd.data.templates import IMAGE_TAG, ROLE_MAP, ConversationEncoder, EncodingError
from movekd.errors import DataError

logger = logging.getLogger(__name__)

_SHOWN_ERRORS = 5


class LlavaFormatError(DataError):
    """A LLaVA JSON file or sample with the wrong structure."""


@dataclass(frozen=True)
class Skipped:
    """Marker for a sample that cannot be used: dropped by the scan, or returned by
    :class:`LlavaDataset` in place of the item. ``reason`` is one of :data:`PROBLEM_KINDS` or an
    :class:`EncodingError` kind."""

    index: int
    id: str
    reason: str
    detail: str = ""


# Kinds of per-sample problems the scan finds (``_sample_problem``) and the dataset meets later.
PROBLEM_KINDS = ("not_an_object", "missing_conversations", "empty_conversations", "bad_turn", "unknown_role",
                 "role_order", "no_question", "no_answer", "image_tag_mismatch", "bad_image_field",
                 "missing_image", "bad_image")


# ------------------------------------------------------------------------------------------ loading
def read_llava_file(path: str | os.PathLike) -> list:
    """The raw records of a ``.json`` (a list) or ``.jsonl`` file; :class:`LlavaFormatError` naming the file,
    line and column when the file is not JSON, or not a list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}" if not path.exists() else f"data path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LlavaFormatError(f"{path}: not UTF-8 text (byte {err.start}): is it a JSON file?") from None
    if path.suffix == ".jsonl":
        samples = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise LlavaFormatError(
                        f"{path}: invalid JSON at line {lineno} column {err.colno}: {err.msg}") from None
                except RecursionError:
                    raise LlavaFormatError(f"{path}: line {lineno} is nested too deeply to be a sample") from None
        return samples
    try:
        samples = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlavaFormatError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno} (char {err.pos}): {err.msg}") from None
    except RecursionError:
        raise LlavaFormatError(f"{path}: nested too deeply to be a list of samples") from None
    if not isinstance(samples, list):
        raise LlavaFormatError(f"{path}: expected a JSON list of samples, got {type(samples).__name__}")
    return samples


def load_llava_json(path: str | os.PathLike, *, require_answer: bool = True, strict: bool = False,
                    image_root: str | os.PathLike | None = None) -> list[dict]:
    """Read a LLaVA-format ``.json`` (a list) or ``.jsonl`` file; return its usable samples.

    Malformed JSON raises :class:`LlavaFormatError` (file, line, column). Bad samples (see
    :func:`scan_llava`) are dropped and logged with their count per kind, or, with ``strict``, raise
    :class:`LlavaFormatError` listing them. ``image_root`` given: samples whose image file does not
    exist are problems too.
    """
    scan = scan_llava(path, image_root=image_root, require_answer=require_answer)
    if strict and scan.problems:
        raise LlavaFormatError(scan.describe_problems())
    scan.log()
    return scan.samples


def sample_id(sample, index: int) -> str:
    return str(sample.get("id", f"#{index}")) if isinstance(sample, dict) else f"#{index}"


def _sample_problem(sample, require_answer: bool) -> tuple[str, str] | None:
    """The first structural problem of one sample as ``(kind, detail)``, or None."""
    if not isinstance(sample, dict):
        return "not_an_object", f"expected an object, got {type(sample).__name__}"
    conv = sample.get("conversations")
    if conv is None:
        return "missing_conversations", 'missing "conversations"'
    if not isinstance(conv, list) or not conv:
        return "empty_conversations", '"conversations" must be a non-empty list'
    expected = "user"
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "bad_turn", f'turn {t}: expected {{"from": ..., "value": str}}'
        role = ROLE_MAP.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            return "unknown_role", f'turn {t}: unknown role "from": {turn.get("from")!r} (expected human, gpt or system)'
        if role == "system":
            if t != 0:
                return "role_order", f"turn {t}: a system turn is only allowed first"
            continue
        if role != expected:
            want = "human" if expected == "user" else "gpt"
            return "role_order", f'turn {t}: expected "from": "{want}", got {turn["from"]!r} (turns must alternate human, gpt)'
        expected = "assistant" if role == "user" else "user"
    if not any(ROLE_MAP[turn["from"]] == "user" for turn in conv):
        return "no_question", "no human turn"
    if require_answer and not any(ROLE_MAP[turn["from"]] == "assistant" for turn in conv):
        return "no_answer", "no gpt turn (nothing to learn from)"
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in conv)
    image = sample.get("image")
    if image is None:
        if tags:
            return "image_tag_mismatch", f'{tags} "<image>" tag(s) but no "image" field'
    elif not isinstance(image, str) or not image:
        return "bad_image_field", '"image" must be a single path (multi-image samples are not supported)'
    elif tags > 1:
        return "image_tag_mismatch", f'{tags} "<image>" tags for one image'
    return None


@dataclass
class DataScan:
    """What :func:`scan_llava` found in one data file: its usable samples and its problems."""

    source: str
    samples: list[dict]  # the usable samples, in file order
    total: int  # records in the file
    problems: list[Skipped] = field(default_factory=list)

    @property
    def with_image(self) -> int:
        return sum(1 for s in self.samples if s.get("image") is not None)

    @property
    def text_only(self) -> int:
        return len(self.samples) - self.with_image

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.problems))

    def examples(self, per_kind: int = 3) -> dict[str, list[str]]:
        """The first ``per_kind`` sample ids of each kind of problem."""
        shown: dict[str, list[str]] = {}
        for p in self.problems:
            ids = shown.setdefault(p.reason, [])
            if len(ids) < per_kind:
                ids.append(p.id)
        return shown

    def summary(self) -> str:
        """One line: samples, images, text-only samples, problems by kind (first ids)."""
        line = (f"{self.source}: {self.total} samples, {len(self.samples)} usable ({self.with_image} with an image, "
                f"{self.text_only} text-only)")
        if not self.problems:
            return line + ", no problems"
        examples = self.examples()
        kinds = "; ".join(f"{kind} {n} (e.g. {', '.join(examples[kind])})" for kind, n in sorted(self.by_kind().items()))
        return f"{line}; {len(self.problems)} skipped: {kinds}"

    def describe_problems(self, limit: int = _SHOWN_ERRORS) -> str:
        """A short list for an error message: the count, then the first ``limit`` problems."""
        lines = [f"sample {p.index} (id={p.id}): {p.reason}: {p.detail}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more ({_counts(self.by_kind())})")
        return f"{self.source}: {len(self.problems)} invalid sample(s):\n  " + "\n  ".join(lines)

    def log(self) -> None:
        if self.problems:
            logger.warning("%s", self.summary())
        else:
            logger.info("%s", self.summary())


def _counts(by_kind: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(by_kind.items()))


def scan_samples(samples: list, *, source: str = "<samples>", require_answer: bool = True,
                 image_root: str | os.PathLike | None = None) -> DataScan:
    """Check every record's structure (and, with ``image_root``, that its image file exists).

    Never raises for a bad record: it becomes a :class:`Skipped` in ``problems``. Image existence is
    checked once per distinct path (LLaVA data repeats images across samples).
    """
    kept, problems = [], []
    exists: dict[str, bool] = {}
    for i, s in enumerate(samples):
        problem = _sample_problem(s, require_answer)
        if problem is None and image_root is not None and s.get("image") is not None:
            path = resolve_image(s, image_root)
            key = str(path)
            if key not in exists:
                exists[key] = path.is_file()
            if not exists[key]:
                problem = ("missing_image", key)
        if problem is None:
            kept.append(s)
        else:
            problems.append(Skipped(i, sample_id(s, i), *problem))
    return DataScan(source, kept, len(samples), problems)


def scan_llava(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
               require_answer: bool = True) -> DataScan:
    """Open ``path`` and check every record (structure; image files exist when ``image_root`` is given).

    Raises :class:`DataError` / :class:`LlavaFormatError` only for the file as a whole (missing, not
    JSON, not a list); per-sample problems are returned in the scan.
    """
    return scan_samples(read_llava_file(path), source=str(path), require_answer=require_answer,
                        image_root=image_root)


def check_skip_budget(skipped: dict[str, int], *, source: str, total: int, drawn: int, max_skip_ratio: float,
                      strict: bool) -> None:
    """Stop when too much of the data is bad: ``strict`` refuses any skip; otherwise more than
    ``max_skip_ratio`` of the samples (the file, or as many as were drawn, whichever is larger).

    ``skipped``: counts per kind (scan problems plus samples skipped while training)."""
    count = sum(skipped.values())
    if strict and count:
        raise DataError(f"{source}: {count} bad sample(s) ({_counts(skipped)}) and the stage is strict; "
                        "fix them or drop strict to skip and count them")
    budget = max_skip_ratio * max(total, drawn)
    if count > budget:
        raise DataError(f"{source}: {count} of {max(total, drawn)} samples skipped ({_counts(skipped)}), more than "
                        f"max_skip_ratio={max_skip_ratio:g}: the data or image_root is probably wrong (raise "
                        "max_skip_ratio to accept it)")


def validate_samples(samples: list, *, source: str = "<samples>", require_answer: bool = True) -> None:
    """Raise :class:`LlavaFormatError` listing the bad samples (index and id) of a loaded list."""
    scan = scan_samples(samples, source=source, require_answer=require_answer)
    if scan.problems:
        raise LlavaFormatError(scan.describe_problems())


# ------------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike, size: int, image_aspect_ratio: str = "stretch",
               fill: tuple[int, int, int] = (0, 0, 0), grid_pinpoints=None):
    """Decode with PIL, convert to RGB, bring to ``size × size`` by ``image_aspect_ratio`` (stretch,
    square or pad with ``fill``: :func:`movekd.data.images.prepare_image`) → ``uint8 [3, size, size]``;
    ``anyres``: :class:`movekd.data.anyres.AnyResImages` (overview + tiles of side ``size``)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    return prepare_image(img, image_aspect_ratio, fill, size, grid_pinpoints)


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
        grid_pinpoints: the AnyRes grid (``image_aspect_ratio="anyres"``; ``image_size`` is then the crop side).
        image_tokens: AnyRes: the tokens an image of ``(height, width)`` becomes
            (:meth:`movekd.vlm.anyres.AnyResPacker.token_counter`); ``max_length`` then counts each
            image's own tokens (a group keeps the questions that fit after its own image) instead of
            the encoder's ``num_image_tokens``. The image is decoded before the text is encoded.
    """

    def __init__(self, samples: list[dict], encoder: ConversationEncoder, *, image_root: str | os.PathLike = ".",
                 image_size: int = 224, prompt_only: bool = False, group_by_image: bool = False,
                 max_questions_per_image: int | None = None, image_aspect_ratio: str = "stretch",
                 fill: tuple[int, int, int] = (0, 0, 0), grid_pinpoints=None,
                 image_tokens: Callable[[tuple[int, int]], int] | None = None):
        if group_by_image and prompt_only:
            raise ValueError("group_by_image is for training; prompts for generation are one per sample")
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; expected one of "
                             f"{', '.join(IMAGE_ASPECT_RATIOS)}")
        if image_aspect_ratio == "anyres" and not grid_pinpoints:
            raise ValueError("image_aspect_ratio 'anyres' needs grid_pinpoints")
        self.image_aspect_ratio = image_aspect_ratio
        self.grid_pinpoints = grid_pinpoints
        if image_tokens is not None and image_aspect_ratio != "anyres":
            raise ValueError("image_tokens (an image's own token count) is for image_aspect_ratio 'anyres'")
        self.image_tokens = image_tokens
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
        image = self._image(index, sample) if has_image else self._blank()
        if isinstance(image, Skipped):
            return image
        encoder = self.encoder
        if self.image_tokens is not None and has_image:
            # AnyRes: max_length counts this image's own tokens (its tile grid), as the model expands it.
            encoder = encoder.with_image_tokens(self.image_tokens(tuple(image.image_sizes[0].tolist())))
        extra = {}
        try:
            if self.groups is not None and len(self.groups[index]) > 1:
                members = [encoder.encode(self.samples[i]["conversations"], has_image) for i in self.groups[index]]
                enc, segment_ids, kept = shared_prefix.merge_shared_prefix(
                    members, max_length=encoder.max_length, num_image_tokens=encoder.num_image_tokens)
                extra = {"segment_ids": segment_ids, "num_questions": kept}
            else:
                encode = encoder.encode_prompt if self.prompt_only else encoder.encode
                enc = encode(sample["conversations"], has_image)
        except EncodingError as err:
            return self._skip(index, sample, err.kind, str(err))
        return {"input_ids": enc.input_ids, "labels": enc.labels, "image": image, "has_image": has_image,
                "id": sample_id(sample, index), "index": index, **extra}

    def _image(self, index: int, sample: dict):
        """The sample's decoded image, or a :class:`Skipped` marker if it is missing or corrupt."""
        path = resolve_image(sample, self.image_root)
        if not path.is_file():
            return self._skip(index, sample, "missing_image", str(path))
        try:
            return read_image(path, self.image_size, self.image_aspect_ratio, self.fill, self.grid_pinpoints)
        except Exception as err:  # PIL raises many types for truncated / non-image files
            return self._skip(index, sample, "bad_image", f"{path}: {type(err).__name__}: {err}")

    def _blank(self):
        """A text-only sample's image: zeros (AnyRes: one blank crop)."""
        if self.image_aspect_ratio == "anyres":
            from movekd.data.anyres import AnyResImages

            return AnyResImages.blank(self.image_size)
        return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)

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
