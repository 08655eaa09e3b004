"""movekd: Mixture-of-Visual-Encoder Knowledge Distillation (MoVE-KD, CVPR 2025).

Several frozen vision encoders (teachers) are distilled into one student encoder of a LLaVA-style
vision-language model; at inference only the student runs.
"""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    # The exact export's vision tower (model_type "movekd_student") loads through AutoConfig/AutoModel
    # once movekd is imported, without trust_remote_code.
    try:
        import transformers  # noqa: F401
    except ImportError:  # pragma: no cover - transformers is a dependency; keep `import movekd` light without it
        return
    from movekd.export import hf_student  # noqa: F401


_register_with_transformers()
