"""Evaluation after training: exact-match VQA accuracy per question type, and the answer prior."""

from __future__ import annotations

import random
from pathlib import Path

from movekd.train.build import resolve_path
from movekd.train.config import EvalConfig


def eval_samples(config: EvalConfig) -> tuple[list[dict], Path]:
    """The fixed evaluation subset: ``max_samples`` drawn with ``seed`` (all if None), questions at
    random or, with ``sample_by="image"``, whole images at random (file order within an image)."""
    from movekd.data import load_llava_json

    path = resolve_path(config.data)
    samples = load_llava_json(path)
    if config.max_samples is not None and config.max_samples < len(samples):
        if config.sample_by == "image":
            samples = _whole_images(samples, config.max_samples, config.seed)
        else:
            samples = random.Random(config.seed).sample(samples, config.max_samples)
    root = resolve_path(config.image_root) if config.image_root else path.parent
    return samples, root


def _whole_images(samples: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` samples: images drawn at random, each with all its questions (the last image cut)."""
    from movekd.data.shared_prefix import group_by_image

    groups = group_by_image(samples)
    random.Random(seed).shuffle(groups)
    chosen: list[dict] = []
    for members in groups:
        chosen += [samples[i] for i in members]
        if len(chosen) >= count:
            break
    return chosen[:count]


def run_eval(loaded, config: EvalConfig, return_predictions: bool = False) -> dict:
    """Accuracy of a loaded VLM (``movekd.inference.LoadedVLM``) plus the answer-prior baseline. The prompt
    format is the bundle's unless ``config`` overrides it."""
    from movekd.data import load_llava_json
    from movekd.eval.vqa import answer_prior_baseline, evaluate_vqa

    samples, root = eval_samples(config)
    mode = config.image_aspect_ratio or loaded.image_aspect_ratio
    if mode == "anyres" and not loaded.grid_pinpoints:
        from movekd.inference import NotAnyResError

        raise NotAnyResError("eval image_aspect_ratio 'anyres': the model was not trained with anyres (its bundle "
                             "has no image_grid_pinpoints / image_newline)")
    with loaded.autocast():
        result = evaluate_vqa(loaded.vlm, loaded.tokenizer, samples, batch_size=config.batch_size,
                              max_new_tokens=config.max_new_tokens, image_root=root,
                              template=config.template or loaded.template,
                              system_prompt=loaded.system_prompt if config.system_prompt is None else config.system_prompt,
                              bos=config.bos or loaded.bos,
                              image_size=loaded.config.replace(image_aspect_ratio=mode).decode_size,
                              return_predictions=return_predictions, word=config.answer_word or loaded.answer_word,
                              image_aspect_ratio=mode, fill=loaded.fill,
                              grid_pinpoints=loaded.grid_pinpoints, share_image_prefix=config.share_image_prefix)
    if config.prior_data:
        prior = answer_prior_baseline(load_llava_json(resolve_path(config.prior_data)), samples)
        result["prior"] = {"accuracy": prior["accuracy"],
                           "per_type": {t: v["accuracy"] for t, v in prior["per_type"].items()}}
    return result
