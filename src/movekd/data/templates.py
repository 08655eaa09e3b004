"""Conversation templates and tokenisation with answer-only labels.

Three templates, chosen by name with :func:`get_template`:

- ``plain`` (stage 1, LLaVA's ``--version plain``): ``[bos] <image> caption <eos>``. The human
  turn's text is dropped (no instruction); only the caption and the EOS after it are supervised.
  LLaVA ends the caption with ``"\\n"``; we end it with the tokenizer's EOS so that a captioning
  model knows when to stop.
- ``chat`` (stage 2): the tokenizer's own chat template (``apply_chat_template``) when it has one,
  else the ``v1`` fallback.
- ``v1``: LLaVA v1 / Vicuna style, ``"<system> USER: q ASSISTANT: a<eos>USER: ..."``.

How labels are found, for every template alike: each assistant turn's supervised text is the
difference between the rendering of the conversation *including* that turn and the rendering of the
conversation before it *with the generation prompt*, with trailing whitespace removed. That is the
answer plus the end-of-turn marker the template writes after it (``<|im_end|>``, ``</s>``, ...),
but not the newline after the marker. A token is supervised when its characters overlap such a span.
This needs "prefix-stable" templates (rendering turn ``i`` never rewrites earlier turns); every
LLaVA / ChatML / Llama / SmolLM template is. A template that is not fails a probe when the encoder is
built (``ValueError``); a single sample that breaks it raises :class:`EncodingError`, which the
dataset turns into a counted skip.

The ``<image>`` tag: the rendered text is split at each ``<image>`` and each piece is tokenised on
its own (as LLaVA's ``tokenizer_image_token`` does); one :data:`IMAGE_TOKEN_INDEX` (-200) is put in
between. The model replaces it with the N projected image tokens. As in LLaVA, an image sample's tag
is moved to the start of the first human turn (``"<image>\\n" + question``).

Truncation rule (``max_length``): the length that counts is the LLM sequence length after image
expansion, i.e. text tokens + ``num_image_tokens`` per placeholder. A longer sequence is cut on the
right (later turns go first, an answer may be cut mid-way). If the cut would remove an image
placeholder, or leave no supervised token, the sample raises :class:`EncodingError` (a counted skip).
A prompt for generation that is too long is also an :class:`EncodingError`: cutting it would change
the question.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import cached_property

import torch

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200
"""Placeholder id put in ``input_ids`` where the image tokens go (LLaVA convention)."""
IGNORE_INDEX = -100
"""Label of positions that are not supervised (PyTorch / HF cross-entropy convention)."""
IMAGE_TAG = "<image>"

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def expanded_length(ids, num_image_tokens: int) -> int:
    """LLM sequence length of token ``ids`` (list or tensor) once each placeholder becomes
    ``num_image_tokens`` image tokens (what ``max_length`` limits)."""
    n_img = sum(1 for t in ids if int(t) == IMAGE_TOKEN_INDEX)
    return len(ids) + n_img * (num_image_tokens - 1)


class EncodingError(ValueError):
    """A conversation that cannot be encoded (too long, template mismatch, nothing to supervise).

    ``kind`` is the reason a skipped sample is counted under: ``too_long`` (the cut would remove the
    image or the question), ``answer_truncated`` (``max_length`` cut away every answer token),
    ``empty_answer``, ``template`` (the sample does not fit the conversation template)."""

    def __init__(self, message: str, kind: str = "encoding"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Encoded:
    """One tokenised conversation. ``labels`` is None for a generation prompt."""

    input_ids: torch.Tensor  # long [L], IMAGE_TOKEN_INDEX at each image position
    labels: torch.Tensor | None  # long [L], IGNORE_INDEX except answers


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA ``[{"from","value"}]`` → chat ``[{"role","content"}]`` (roles human/gpt/system)."""
    return [{"role": ROLE_MAP[turn["from"]], "content": turn["value"]} for turn in conversations]


# ----------------------------------------------------------------------------------------- templates
BOS_MODES = ("auto", "always", "never")


class ConversationTemplate:
    """Renders a list of chat messages to a string. Subclasses implement :meth:`render`.

    ``bos`` (``plain`` and ``v1`` only; chat templates write their own start): ``"auto"`` starts
    with the tokenizer's BOS when the tokenizer adds one by itself (LLaVA on Llama/Vicuna);
    ``"always"`` starts with ``tokenizer.bos_token`` even when it does not (SmolLM2, Qwen), so the
    image is never the first token; ``"never"`` starts with no BOS."""

    name = "base"

    def __init__(self, tokenizer, bos: str = "auto"):
        if bos not in BOS_MODES:
            raise ValueError(f"bos must be one of {', '.join(BOS_MODES)}; got {bos!r}")
        if bos == "always" and (tokenizer.bos_token is None or tokenizer.bos_token_id is None):
            raise ValueError("bos: 'always' needs a tokenizer with a bos_token; this one has none")
        self.tokenizer = tokenizer
        self.bos_mode = bos

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def prepare(self, messages: list[dict]) -> list[dict]:
        """Template-specific rewriting of the messages before rendering (default: none)."""
        return messages

    # Shared helpers ---------------------------------------------------------------------------
    @property
    def eos(self) -> str:
        eos = self.tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; plain/v1 templates need one")
        return eos

    @cached_property
    def bos(self) -> str:
        """The BOS text the rendering starts with (see ``bos`` in the class docstring)."""
        tok = self.tokenizer
        if self.bos_mode == "never":
            return ""
        if tok.bos_token is None or tok.bos_token_id is None:
            return ""
        if self.bos_mode == "always":
            return tok.bos_token
        probe = tok("a", add_special_tokens=True)["input_ids"]
        return tok.bos_token if probe and probe[0] == tok.bos_token_id else ""


class PlainTemplate(ConversationTemplate):
    """LLaVA ``plain`` (stage 1): image then caption, no instruction text."""

    name = "plain"

    def prepare(self, messages: list[dict]) -> list[dict]:
        msgs = [m for m in messages if m["role"] != "system"]
        if len(msgs) not in (1, 2) or msgs[0]["role"] != "user" or (len(msgs) == 2 and msgs[1]["role"] != "assistant"):
            raise EncodingError("the plain template needs exactly one human turn then one gpt turn (a caption)",
                                "template")
        # Keep only the image tag of the human turn (LLaVA: source[0]['value'] = DEFAULT_IMAGE_TOKEN).
        user = {"role": "user", "content": IMAGE_TAG if IMAGE_TAG in msgs[0]["content"] else ""}
        return [user] + msgs[1:]

    def render(self, messages, add_generation_prompt=False):
        text = self.bos
        for m in messages:
            text += m["content"] if m["role"] == "user" else m["content"] + self.eos
        return text


class V1Template(ConversationTemplate):
    """LLaVA v1 / Vicuna: ``"SYSTEM USER: q ASSISTANT: a</s>USER: ..."``."""

    name = "v1"

    def render(self, messages, add_generation_prompt=False):
        system = V1_SYSTEM
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = self.bos + system + " "
        for m in messages:
            if m["role"] == "user":
                text += "USER: " + m["content"] + " "
            else:
                text += "ASSISTANT: " + m["content"] + self.eos
        if add_generation_prompt:
            text += "ASSISTANT:"
        return text


class TokenizerChatTemplate(ConversationTemplate):
    """The tokenizer's own chat template, through ``apply_chat_template``."""

    name = "chat"

    def render(self, messages, add_generation_prompt=False):
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def get_template(name: str, tokenizer, bos: str = "auto") -> ConversationTemplate:
    """``"plain"``, ``"v1"``, or ``"chat"`` (tokenizer template if set, else ``v1``); ``bos`` as in
    :class:`ConversationTemplate`."""
    if name == "plain":
        return PlainTemplate(tokenizer, bos)
    if name == "v1":
        return V1Template(tokenizer, bos)
    if name == "chat":
        if getattr(tokenizer, "chat_template", None):
            return TokenizerChatTemplate(tokenizer, bos)
        logger.info("tokenizer has no chat template; using the LLaVA v1 fallback")
        return V1Template(tokenizer, bos)
    raise ValueError(f"unknown conversation template {name!r}; expected 'plain', 'chat' or 'v1'")


# ------------------------------------------------------------------------------------------ encoder
class ConversationEncoder:
    """Turns LLaVA conversations into ``input_ids`` / ``labels`` for one tokenizer and template.

    Args:
        tokenizer: a fast HF tokenizer (offsets are needed to place labels).
        template: ``"plain"``, ``"chat"``, ``"v1"`` or a :class:`ConversationTemplate`.
        max_length: maximum LLM sequence length after image expansion (None: no limit).
        num_image_tokens: N, the number of tokens each image placeholder expands to (for ``max_length``).
        system_prompt: if not None, a system message added to conversations that have none.
        bos: ``"auto"``, ``"always"`` or ``"never"`` (:class:`ConversationTemplate`; template names only).
    """

    def __init__(self, tokenizer, template="chat", *, max_length: int | None = None,
                 num_image_tokens: int = 1, system_prompt: str | None = None, bos: str = "auto"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("ConversationEncoder needs a fast tokenizer (it uses offset mappings)")
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer, bos) if isinstance(template, str) else template
        self.max_length = max_length
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        self._probe()

    # Public --------------------------------------------------------------------------------------
    def with_image_tokens(self, num_image_tokens: int) -> "ConversationEncoder":
        """This encoder for an image of ``num_image_tokens`` tokens (AnyRes: ``max_length`` then
        counts the image's own tokens, not the most any image takes)."""
        other = copy.copy(self)
        other.num_image_tokens = num_image_tokens
        return other

    def encode(self, conversations: list[dict], has_image: bool) -> Encoded:
        """Training encoding: every assistant turn supervised. Raises :class:`EncodingError`."""
        messages = self._messages(conversations, has_image)
        text, spans = self._render_with_spans(messages)
        ids, offsets = self._tokenize(text)
        labels = [IGNORE_INDEX] * len(ids)
        for k, (start, end) in enumerate(offsets):
            if ids[k] != IMAGE_TOKEN_INDEX and any(start < e and end > s for s, e in spans):
                labels[k] = ids[k]
        had_answer = any(label != IGNORE_INDEX for label in labels)
        ids, labels = self._truncate(ids, labels)
        if all(label == IGNORE_INDEX for label in labels):
            if had_answer:
                raise EncodingError(f"max_length={self.max_length} cuts away every answer token: no supervised "
                                    "token left", "answer_truncated")
            raise EncodingError("no supervised token (empty answers?)", "empty_answer")
        return Encoded(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))

    def encode_prompt(self, conversations: list[dict], has_image: bool) -> Encoded:
        """Generation prompt: the conversation up to its last human turn, plus the generation prompt.

        A trailing gpt turn (the reference answer) is dropped.
        """
        messages = self._messages(conversations, has_image)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = self.template.render(messages, add_generation_prompt=True)  # plain ignores the flag
        ids, _ = self._tokenize(text)
        if self.max_length is not None and self._expanded_len(ids) > self.max_length:
            raise EncodingError(f"prompt longer than max_length={self.max_length}", "too_long")
        return Encoded(torch.tensor(ids, dtype=torch.long), None)

    # Internals -----------------------------------------------------------------------------------
    def _messages(self, conversations, has_image):
        messages = to_messages(conversations)
        if has_image:
            # LLaVA preprocess_multimodal: the tag goes to the start of the first human turn.
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            for m in messages:
                if IMAGE_TAG in m["content"]:
                    m["content"] = m["content"].replace(IMAGE_TAG, "").strip()
            messages[first]["content"] = IMAGE_TAG + "\n" + messages[first]["content"]
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.template.prepare(messages)

    def _render_with_spans(self, messages):
        """Full rendering plus the character spans of each assistant turn (see module docstring)."""
        full = self.template.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.template.render(messages[:i], add_generation_prompt=True)
            upto = self.template.render(messages[: i + 1])
            if not upto.startswith(before) or not full.startswith(upto):
                raise EncodingError("the conversation template is not prefix-stable for this sample", "template")
            end = len(before) + len(upto[len(before):].rstrip())
            spans.append((len(before), end))
        return full, spans

    def _tokenize(self, text):
        """Token ids and character offsets; each ``<image>`` becomes one IMAGE_TOKEN_INDEX."""
        ids, offsets, base = [], [], 0
        for j, piece in enumerate(text.split(IMAGE_TAG)):
            if j > 0:
                ids.append(IMAGE_TOKEN_INDEX)
                offsets.append((base, base + len(IMAGE_TAG)))
                base += len(IMAGE_TAG)
            if piece:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                ids.extend(enc["input_ids"])
                offsets.extend((base + s, base + e) for s, e in enc["offset_mapping"])
            base += len(piece)
        return ids, offsets

    def _expanded_len(self, ids):
        return expanded_length(ids, self.num_image_tokens)

    def _truncate(self, ids, labels):
        if self.max_length is None or self._expanded_len(ids) <= self.max_length:
            return ids, labels
        cut, length = 0, 0
        for t in ids:
            length += self.num_image_tokens if t == IMAGE_TOKEN_INDEX else 1
            if length > self.max_length:
                break
            cut += 1
        if any(t == IMAGE_TOKEN_INDEX for t in ids[cut:]):
            raise EncodingError(f"max_length={self.max_length} would cut an image placeholder", "too_long")
        return ids[:cut], labels[:cut]

    def _probe(self):
        """Check once that the template is prefix-stable on a two-turn conversation."""
        if self.template.name == "plain":
            return
        probe = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                 {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
        try:
            _, spans = self._render_with_spans(self._messages(probe, has_image=False))
        except EncodingError as err:
            raise ValueError(
                f"the {self.template.name!r} template of this tokenizer is not prefix-stable, so answer "
                "labels cannot be placed; use template='v1'"
            ) from err
        if len(spans) != 2:
            raise ValueError("template probe found the wrong number of assistant turns")
