"""Pure tensor functions of MoVE-KD (no modules, no config): the paper's Eq. 2-4 and the balance loss.

All of them cast their inputs up to float32 before reducing: the official code runs them in bf16,
where the near-uniform token weights (~1/576 each) quantise to a handful of values and the per-token
MSE sums lose digits. The cast costs one [B, N, D] copy at most. Outputs are float32.
"""

from movekd.functional.balance import balance_loss
from movekd.functional.kd_loss import kd_loss, kd_loss_per_teacher
from movekd.functional.teacher_weight import teacher_weight
from movekd.functional.text_token_weight import text_token_weight
from movekd.functional.token_weight import token_weight, token_weight_qv

__all__ = [
    "balance_loss",
    "kd_loss",
    "kd_loss_per_teacher",
    "teacher_weight",
    "text_token_weight",
    "token_weight",
    "token_weight_qv",
]
