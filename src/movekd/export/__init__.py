"""Export a movekd bundle to other formats: Hugging Face LLaVA (``movekd export --format hf-llava``).

``export_hf_llava`` writes the folder; :mod:`.merge` folds MoLE experts into plain FFNs (the stock
export); :mod:`.hf_student` is the ``movekd_student`` HF model of the exact export; :mod:`.processor`
builds the processor (image preprocessing, ``<image>`` token, chat template); :mod:`.card` the card.
"""

from movekd.export.hf_llava import EXPORT_INFO, FORMATS, ExportResult, export_hf_llava
from movekd.export.merge import MERGES, expert_usage, feature_distance, merge_weights, merged_student

__all__ = ["EXPORT_INFO", "FORMATS", "MERGES", "ExportResult", "expert_usage", "export_hf_llava",
           "feature_distance", "merge_weights", "merged_student"]
