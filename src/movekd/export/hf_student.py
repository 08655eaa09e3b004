"""The MoLE student as a Hugging Face model (``model_type = "movekd_student"``), for the exact export.

``movekd export --merge none`` writes an HF LLaVA folder whose ``vision_config`` is this type, so
``LlavaForConditionalGeneration.from_pretrained`` builds the routed student itself (no expert is
merged, logits are those of the bundle). Importing this module registers the type with ``AutoConfig``
and ``AutoModel`` (no ``trust_remote_code``: the code is the installed package, not the folder);
``import movekd`` arranges for that to happen when transformers is imported
(:mod:`movekd._hf_registration`), so ``import movekd`` stays light.

The model takes ``pixel_values`` already normalised by the exported image processor (the student's
own preprocessing, :mod:`movekd.export.processor`) and returns every hidden state of its encoder
(``hidden_states[k]`` is what movekd's student hands the projector, CLS first), so stock LLaVA's
``vision_feature_layer`` / ``vision_feature_select_strategy`` pick the same tokens.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

MODEL_TYPE = "movekd_student"


class MoveKDStudentConfig(PreTrainedConfig):
    """``student``: the rebuild recipe of :class:`movekd.student.Student` (``Student.config``)."""

    model_type = MODEL_TYPE

    def __init__(self, student: dict | None = None, hidden_size: int = 0, patch_size: int = 14,
                 image_size: int = 224, **kwargs):
        self.student = dict(student or {})
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.image_size = image_size
        super().__init__(**kwargs)


class MoveKDStudentModel(PreTrainedModel):
    config_class = MoveKDStudentConfig
    config: MoveKDStudentConfig
    base_model_prefix = "student"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True

    def __init__(self, config: MoveKDStudentConfig):
        super().__init__(config)
        from movekd.student import build_student

        self.student = build_student(config.student)
        self.post_init()

    def _init_weights(self, module) -> None:
        pass  # weights always come from the exported folder

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def forward(self, pixel_values: torch.Tensor, output_hidden_states=None, return_dict: bool = True,
                **kwargs) -> BaseModelOutput:
        encoder = self.student.encoder
        dtype = next(encoder.parameters()).dtype
        out = encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True, **self.student.forward_kwargs)
        return BaseModelOutput(last_hidden_state=out.hidden_states[-1], hidden_states=out.hidden_states)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` know ``movekd_student`` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, MoveKDStudentConfig)
        AutoModel.register(MoveKDStudentConfig, MoveKDStudentModel)
    except ValueError:  # already registered (module re-imported)
        pass


register()
