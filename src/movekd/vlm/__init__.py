"""VLM assembly: student encoder → projector → causal LLM, and the inference bundle on disk."""

from movekd.vlm.config import ProjectorConfig, VLMConfig, config_for
from movekd.vlm.io import load_tokenizer, load_vlm, read_config, read_vlm_config, save_vlm
from movekd.vlm.model import MoveKDVLM, VLMOutput, merge_image_tokens
from movekd.vlm.projector import build_projector, list_projectors, register_projector

__all__ = [
    "MoveKDVLM", "ProjectorConfig", "VLMConfig", "VLMOutput", "build_projector", "config_for", "list_projectors",
    "load_tokenizer", "load_vlm", "merge_image_tokens", "read_config", "read_vlm_config", "register_projector",
    "save_vlm",
]
