"""The paper's ablations as config deltas (functions editing a config dict), one row each.

Every row keeps the config's stages, steps, batch sizes and data, so rows cost the same compute
(equal steps; rows without teachers are cheaper per step, as in the paper). ``full`` is the config
as given (MoVE-KD with every component).

| row | paper | delta from the config |
|---|---|---|
| ``baseline`` | Table 2/3 baseline (LLaVA) | no KD, no MoLE, no teachers, encoder frozen |
| ``interpolate`` | Table 2 row 1 | adapter ``interpolate``, no MoLE, no token / teacher weight |
| ``adapter`` | Table 2 row 2 | the config's adapter, no MoLE, no token / teacher weight |
| ``mole`` | Table 2 row 3 | + MoLE |
| ``token_weight`` | Table 2 row 4 | + token weight (Eq. 3) |
| ``full`` | Table 2 row 5 | + teacher weight (Eq. 4) = the config |
| ``text_token_weight`` | §5.1 | full, token weight from the question |
| ``mole_no_kd`` | Table 3 | MoLE without KD (no teachers) |
| ``alpha_0.6/0.7/0.9`` | Table 4 | CLIP weight α (``full`` is 0.8) |
| ``encoder_frozen`` | Table 5 | full, the student's own weights never trained (MoLE still) |
"""

from __future__ import annotations

from typing import Callable

from movekd.errors import OptionError

Delta = Callable[[dict], None]


def _set_kd(**values) -> Delta:
    def apply(data: dict) -> None:
        data.setdefault("kd", {}).update(values)

    return apply


def _mole(enabled: bool) -> Delta:
    def apply(data: dict) -> None:
        data["model"]["student"].setdefault("mole", {})["enabled"] = enabled
        if not enabled:
            for stage in data["stages"]:
                stage["train"] = [g for g in stage.get("train", []) if g != "mole"]
                stage["lrs"] = {k: v for k, v in stage.get("lrs", {}).items() if k != "mole"}

    return apply


def _no_teachers(data: dict) -> None:
    data["kd"] = {**data.get("kd", {}), "enabled": False}
    data["model"]["teachers"] = []
    for stage in data["stages"]:
        stage["train"] = [g for g in stage.get("train", []) if g != "adapters"]
        stage["lrs"] = {k: v for k, v in stage.get("lrs", {}).items() if k != "adapters"}
        stage["kd"] = False


def _freeze_encoder(data: dict) -> None:
    for stage in data["stages"]:
        stage["train"] = [g for g in stage.get("train", []) if g != "student"]
        stage["lrs"] = {k: v for k, v in stage.get("lrs", {}).items() if k != "student"}


def _adapter(name: str | None) -> Delta:
    def apply(data: dict) -> None:
        if name is not None:
            data["model"]["adapter"] = name

    return apply


def _chain(*deltas: Delta) -> Delta:
    def apply(data: dict) -> None:
        for delta in deltas:
            delta(data)

    return apply


_PLAIN_KD = _set_kd(token_weight=False, teacher_weight=False)
ROWS: dict[str, tuple[str, Delta]] = {
    "baseline": ("Table 2/3 baseline: no KD, no MoLE, encoder frozen",
                 _chain(_no_teachers, _mole(False), _freeze_encoder)),
    "interpolate": ("Table 2: KD by interpolation", _chain(_adapter("interpolate"), _mole(False), _PLAIN_KD)),
    "adapter": ("Table 2: + encoder adapter", _chain(_mole(False), _PLAIN_KD)),
    "mole": ("Table 2: + MoLE", _PLAIN_KD),
    "token_weight": ("Table 2: + token weight (Eq. 3)", _set_kd(token_weight=True, teacher_weight=False)),
    "full": ("Table 2: + teacher weight (Eq. 4) = MoVE-KD", _chain()),
    "text_token_weight": ("5.1: token weight from the question", _set_kd(token_weight_source="text")),
    "mole_no_kd": ("Table 3: MoLE without KD", _chain(_no_teachers, _mole(True))),
    "alpha_0.6": ("Table 4: CLIP weight 0.6", _set_kd(alpha=0.6)),
    "alpha_0.7": ("Table 4: CLIP weight 0.7", _set_kd(alpha=0.7)),
    "alpha_0.9": ("Table 4: CLIP weight 0.9", _set_kd(alpha=0.9)),
    "encoder_frozen": ("Table 5: student weights frozen (MoLE trained)", _freeze_encoder),
}
DEFAULT_ROWS = ("baseline", "interpolate", "adapter", "mole", "token_weight", "full", "mole_no_kd",
                "alpha_0.6", "alpha_0.9", "encoder_frozen")


def row_config(data: dict, row: str, seed: int, out_dir: str) -> dict:
    """A copy of the config dict with the row's delta, the seed and its own run folder."""
    import copy

    if row not in ROWS:
        raise OptionError(f"unknown ablation row {row!r}; rows: {', '.join(ROWS)}")
    data = copy.deepcopy(data)
    ROWS[row][1](data)
    data["seed"] = seed
    data["name"] = f"{data.get('name', 'run')}-{row}-s{seed}"
    data["output_dir"] = out_dir
    return data
