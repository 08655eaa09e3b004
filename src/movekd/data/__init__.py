"""LLaVA-format data: JSON loading and validation, conversation templates, collation."""

from movekd.data.collate import Collator, SkipCounter, pad_sequences, pad_token_id_of
from movekd.data.images import IMAGE_ASPECT_RATIOS, expand2square, fill_colour, prepare_image
from movekd.data.llava_json import (
    DataScan,
    LlavaDataset,
    LlavaFormatError,
    Skipped,
    check_images,
    check_skip_budget,
    load_llava_json,
    read_image,
    scan_llava,
    validate_samples,
)
from movekd.data.templates import (
    IGNORE_INDEX,
    IMAGE_TAG,
    IMAGE_TOKEN_INDEX,
    ConversationEncoder,
    Encoded,
    EncodingError,
    get_template,
)

__all__ = [
    "IGNORE_INDEX", "IMAGE_ASPECT_RATIOS", "IMAGE_TAG", "IMAGE_TOKEN_INDEX",
    "Collator", "ConversationEncoder", "Encoded", "EncodingError", "LlavaDataset", "LlavaFormatError",
    "DataScan", "SkipCounter", "Skipped",
    "check_images", "check_skip_budget", "expand2square", "fill_colour", "get_template", "load_llava_json",
    "pad_sequences", "pad_token_id_of", "prepare_image", "read_image", "scan_llava", "validate_samples",
]
