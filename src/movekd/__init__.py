"""movekd: Mixture-of-Visual-Encoder Knowledge Distillation (MoVE-KD, CVPR 2025).

Several frozen vision encoders (teachers) are distilled into one student encoder of a LLaVA-style
vision-language model; at inference only the student runs.

Importing the package is light (no torch, no transformers); the exact export's ``movekd_student``
HF type is registered with transformers when transformers is imported (:mod:`movekd._hf_registration`).
"""

__version__ = "0.1.0"

from movekd._hf_registration import arrange_registration as _arrange_registration

_arrange_registration()
