"""Which word of a generated answer is scored (:func:`movekd.eval.vqa.normalize_answer`): ``first``
(single-word answers), ``last`` (answers after a rationale, the demo's "a blue circle; not red: yes")
or ``all``. One definition for the training config, the bundle's ``VLMConfig`` and the CLI (kept free of
torch: ``movekd --help`` imports it)."""

from __future__ import annotations

from typing import Literal, get_args

AnswerWord = Literal["first", "last", "all"]
ANSWER_WORDS: tuple[str, ...] = get_args(AnswerWord)
