"""The training-time system: student VLM + frozen teachers + encoder adapters → all loss terms.

One forward computes, from a single student pass (paper §3, Eq. 5):

    L = L_text + λ_kd · L_kd + λ_bal · L_bal

- ``L_text``: the LLM's next-token loss on the answers (the VLM forward).
- ``L_kd`` (Eq. 2): MSE between the student's patch tokens (select layer, before the projector) and
  each teacher's tokens, mapped to the student grid and width by its adapter; weighted per token by
  the CLIP-role teacher's [CLS] attention (Eq. 3), or with ``kd.token_weight_source: text`` by the
  question (``movekd.functional.text_token_weight``, the paper's rejected §5.1 variant), and per
  teacher by Eq. 4.
- ``L_bal``: the load-balance loss over the router probabilities of every MoLE layer.

Teachers are registered submodules (``.to()``, dtype casts and DDP see them) but frozen and kept out
of optimisers and checkpoints (``movekd.teachers.base``). Teacher 0 plays the CLIP role: its tokens
must already match the student's grid and width (as in the paper, where the student is initialised
from it), so it has no adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from movekd.data.templates import IGNORE_INDEX
from movekd.errors import UserError
from movekd.functional import balance_loss, kd_loss_per_teacher, teacher_weight, text_token_weight, token_weight
from movekd.mole import collect_router_probs
from movekd.train.config import KDConfig
from movekd.train.teacher_cache import CachedTeacher, TeacherCache


class TeacherShapeError(UserError, ValueError):
    """A teacher's output does not fit what the student or its adapter expects."""


@dataclass
class StepLosses:
    total: Tensor
    text: Tensor
    kd: Tensor | None = None
    balance: Tensor | None = None
    # detached diagnostics for logging
    kd_per_teacher: list[float] = field(default_factory=list)
    teacher_weights: list[float] = field(default_factory=list)
    expert_usage: list[float] = field(default_factory=list)
    # items each term is a mean over (supervised tokens, distilled samples, samples): the
    # collective-safe loop turns the per-rank means into global ones (movekd.train.distributed)
    counts: dict[str, int] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        out = {"loss": self.total.item(), "text": self.text.item()}
        if self.kd is not None:
            out["kd"] = self.kd.item()
        if self.balance is not None:
            out["balance"] = self.balance.item()
        for name, values in (("kd_t", self.kd_per_teacher), ("w_t", self.teacher_weights),
                             ("expert", self.expert_usage)):
            out.update({f"{name}{k}": v for k, v in enumerate(values)})
        return out


class MoveKDModel(nn.Module):
    def __init__(self, vlm: nn.Module, teachers: list[nn.Module], adapters: list[nn.Module | None],
                 kd: KDConfig, student_grid: tuple[int, int], teacher_names: list[str] | None = None,
                 cache: TeacherCache | None = None):
        super().__init__()
        if len(adapters) != len(teachers):
            raise ValueError(f"{len(teachers)} teachers but {len(adapters)} adapters")
        self.vlm = vlm
        self.teachers = nn.ModuleList(teachers)
        # Identity keeps indices aligned: teacher 0 (CLIP role) is used as is.
        self.adapters = nn.ModuleList([a if a is not None else nn.Identity() for a in adapters])
        self.kd = kd
        self.student_grid = tuple(student_grid)
        self.teacher_names = teacher_names or [f"t{k}" for k in range(len(teachers))]
        self.cache = cache

    # --- teachers ---------------------------------------------------------------------------------
    def _run_teacher(self, k: int, images: Tensor) -> list[CachedTeacher]:
        out = self.teachers[k](images)
        weight = (token_weight(out.attn, mode=self.kd.token_weight_mode)
                  if (k == 0 and self.kd.token_weight and out.attn is not None) else None)
        return [
            CachedTeacher(out.tokens[b], out.cls[b] if out.cls is not None else None,
                          weight[b] if weight is not None else None)
            for b in range(out.tokens.shape[0])
        ] + [out.grid]

    def teacher_outputs(self, k: int, images: Tensor, keys: list[str] | None):
        """Per-sample teacher outputs (from the cache where possible) and the teacher's grid."""
        if self.cache is None or keys is None:
            *items, grid = self._run_teacher(k, images)
            return items, grid
        found = [self.cache.get(k, key) for key in keys]
        missing = [b for b, item in enumerate(found) if item is None]
        if missing:
            *computed, grid = self._run_teacher(k, images[missing])
            self.cache.grids[k] = grid
            for b, item in zip(missing, computed):
                found[b] = item
                self.cache.put(k, keys[b], CachedTeacher(*(t.detach().cpu() if t is not None else None
                                                            for t in (item.tokens, item.cls, item.token_weight))))
        device = images.device
        return [CachedTeacher(*(t.to(device) if t is not None else None
                                for t in (i.tokens, i.cls, i.token_weight))) for i in found], self.cache.grids[k]

    # --- losses -----------------------------------------------------------------------------------
    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                has_image: Tensor | None = None, image_keys: list[str] | None = None,
                use_kd: bool = True, segment_ids: Tensor | None = None) -> StepLosses:
        out = self.vlm(images, input_ids, attention_mask, labels, supervised_logits_only=True,
                       segment_ids=segment_ids)
        text = out.loss
        total = text
        losses = StepLosses(total=total, text=text)
        if out.labels is not None:
            losses.counts["text"] = int((out.labels[:, 1:] != IGNORE_INDEX).sum())
        student = out.vision
        if not (use_kd and self.kd.enabled):
            return losses

        router_probs = getattr(student, "router_probs", None)
        if router_probs is None:
            router_probs = collect_router_probs(self.vlm.vision)
        if router_probs:
            balance = balance_loss(router_probs)
            losses.balance = balance
            losses.counts["balance"] = int(router_probs[0].shape[0])
            total = total + self.kd.lambda_balance * balance
            with torch.no_grad():
                usage = torch.cat([p.reshape(-1, p.shape[-1]) for p in router_probs]).argmax(-1)
                counts = torch.bincount(usage, minlength=router_probs[0].shape[-1]).float()
                losses.expert_usage = (counts / counts.sum()).tolist()

        if len(self.teachers):
            crops, sample_of, crop_index = self._kd_items(images)
            select = torch.ones(len(sample_of), dtype=torch.bool, device=crops.device)
            if has_image is not None and not self.kd.kd_on_text_only:
                select = has_image.to(crops.device).bool()[sample_of]
            if crop_index is not None and self.kd.anyres_distill == "overview":
                select = select & (crop_index == 0)
            if select.any():
                text_weight = None
                if self.kd.token_weight and self.kd.token_weight_source == "text":
                    # each crop weighted by its own sample's prompt
                    text_weight = self._text_token_weight(student.tokens, input_ids[sample_of],
                                                          attention_mask[sample_of], labels[sample_of])[select]
                keys = None
                if image_keys is not None:  # cache keys: one per crop under AnyRes
                    picked = select.nonzero().flatten().tolist()
                    samples = sample_of.tolist()
                    keys = [image_keys[samples[i]] for i in picked]
                    if crop_index is not None:
                        crop = crop_index.tolist()
                        keys = [f"{key}#{crop[i]}" for key, i in zip(keys, picked)]
                kd, per_teacher, weights = self._kd(student.tokens[select], crops[select], keys, text_weight)
                losses.kd = kd
                losses.counts["kd"] = int(select.sum())
                losses.kd_per_teacher = per_teacher
                losses.teacher_weights = weights
                total = total + self.kd.lambda_kd * kd
        losses.total = total
        return losses

    @staticmethod
    def _kd_items(images):
        """The items KD runs on: ``(images [I,3,H,W], sample of each item [I], crop index or None)``.
        A plain batch: one item per sample. AnyRes: every crop is an item (overview = crop 0), so the
        teachers see exactly the crop the student saw and Eq. 3/4 are computed per crop."""
        from movekd.data.anyres import AnyResImages

        if not isinstance(images, AnyResImages):
            return images, torch.arange(images.shape[0], device=images.device), None
        sample_of = images.image_of_crop().to(images.device)
        starts = (torch.cumsum(images.crop_counts, 0) - images.crop_counts).to(images.device)
        return images.crops, sample_of, torch.arange(len(sample_of), device=images.device) - starts[sample_of]

    def _check_adapter_input(self, k: int, tokens: Tensor, grid) -> None:
        """Teacher k's tokens must have the channels (and, for a fixed-grid adapter, the token count)
        its adapter was built for; otherwise name the teacher and both shapes instead of a matmul error."""
        adapter = self.adapters[k]
        channels = getattr(adapter, "teacher_channels", None)
        fixed_tokens = getattr(adapter, "teacher_tokens", None)  # token_mix mixes a fixed number of tokens
        if (channels is not None and tokens.shape[-1] != channels) or (
                fixed_tokens is not None and tokens.shape[1] != fixed_tokens):
            expected = (fixed_tokens if fixed_tokens is not None else "N", channels)
            raise TeacherShapeError(
                f"teacher '{self.teacher_names[k]}' gives tokens {tuple(tokens.shape[1:])} (grid {tuple(grid)}) but "
                f"its adapter ({type(adapter).__name__}) was built for {expected} (grid "
                f"{tuple(getattr(adapter, 'teacher_grid', ()))}): the teacher's spec (model, layer, image_size) "
                "changed since the adapter was built or saved")

    def _text_token_weight(self, tokens: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Token weight from the prompt: projected visual tokens vs the prompt's text embeddings
        (unsupervised, non-image, non-padding positions: question, template and system text)."""
        with torch.no_grad():
            proj_dtype = next((p.dtype for p in self.vlm.projector.parameters()), tokens.dtype)
            visual = self.vlm.projector(tokens.detach().to(proj_dtype))
            is_image = input_ids == self.vlm.image_token_index
            text = self.vlm.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
            mask = attention_mask.bool() & ~is_image & (labels == IGNORE_INDEX)
            return text_token_weight(visual, text, mask, self.kd.text_token_weight_temperature)

    def _kd(self, student_tokens: Tensor, images: Tensor, keys: list[str] | None, text_weight: Tensor | None = None):
        adapted, clip_cls, weight = [], None, None
        for k in range(len(self.teachers)):
            items, grid = self.teacher_outputs(k, images, keys)
            tokens = torch.stack([i.tokens for i in items])
            if k == 0:
                if tokens.shape[1:] != student_tokens.shape[1:]:
                    raise TeacherShapeError(
                        f"CLIP-role teacher '{self.teacher_names[0]}' gives tokens {tuple(tokens.shape[1:])} but "
                        f"the student gives {tuple(student_tokens.shape[1:])}: teacher 0 must match the student's "
                        "grid and width (same architecture and input size)")
                if items[0].cls is not None:
                    clip_cls = torch.stack([i.cls for i in items])
                if items[0].token_weight is not None:
                    weight = torch.stack([i.token_weight for i in items])
                adapted.append(tokens)
            else:
                self._check_adapter_input(k, tokens, grid)
                adapted.append(self.adapters[k](tokens.to(student_tokens.dtype), grid, self.student_grid))
        if text_weight is not None:
            weight = text_weight
        per_teacher = kd_loss_per_teacher(student_tokens, adapted, weight if self.kd.token_weight else None)
        if clip_cls is not None and (self.kd.teacher_weight or len(adapted) > 1):
            scale = clip_cls.shape[-1] ** -0.5 if self.kd.teacher_weight_scale == "sqrt_d" else None
            weights = teacher_weight(clip_cls, adapted, alpha=self.kd.alpha, adaptive=self.kd.teacher_weight,
                                     flatten_threshold=self.kd.teacher_weight_flatten_threshold, scale=scale)
        else:
            weights = torch.full_like(per_teacher, 1.0 / per_teacher.shape[1])
        kd = (weights * per_teacher).sum(-1).mean()
        with torch.no_grad():
            return kd, per_teacher.mean(0).tolist(), weights.float().mean(0).tolist()
