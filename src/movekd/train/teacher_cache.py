"""In-run cache of the frozen teachers' outputs, keyed by image.

Teachers are frozen and run in eval mode, so their outputs for an image never change within a run;
easy-vqa asks about ten questions per image, so caching saves most teacher forwards. Only what the
loss needs is kept: the tokens, and for the CLIP-role teacher its CLS and the token weight (Eq. 3)
instead of the full attention map. Stored on the CPU in the dtype the teacher produced (so a cached
value equals a recomputed one), bounded by ``max_items``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class CachedTeacher:
    tokens: torch.Tensor  # [N, C]
    cls: torch.Tensor | None  # [C]
    token_weight: torch.Tensor | None  # [N]


class TeacherCache:
    def __init__(self, max_items: int = 50_000):
        self.max_items = max_items
        self.items: OrderedDict[tuple[int, str], CachedTeacher] = OrderedDict()
        self.grids: dict[int, tuple[int, int]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, teacher: int, key: str) -> CachedTeacher | None:
        found = self.items.get((teacher, key))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
            self.items.move_to_end((teacher, key))
        return found

    def put(self, teacher: int, key: str, value: CachedTeacher) -> None:
        self.items[(teacher, key)] = value
        if len(self.items) > self.max_items:
            self.items.popitem(last=False)

    def __len__(self) -> int:
        return len(self.items)
