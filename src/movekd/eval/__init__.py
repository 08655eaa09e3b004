"""Evaluation: VQA exact match and baselines."""

from movekd.eval.vqa import answer_prior_baseline, evaluate_vqa, normalize_answer

__all__ = ["answer_prior_baseline", "evaluate_vqa", "normalize_answer"]
