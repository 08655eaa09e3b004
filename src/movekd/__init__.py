"""movekd: Mixture-of-Visual-Encoder Knowledge Distillation (MoVE-KD, CVPR 2025).

Several frozen vision encoders (teachers) are distilled into one student encoder of a LLaVA-style
vision-language model; at inference only the student runs.
"""

__version__ = "0.1.0"
