"""``movekd eval CHECKPOINT --data DATA.json [--json]``: exact-match VQA accuracy."""

from __future__ import annotations

import json

from movekd.atomic import atomic_write_text
from movekd.config.answer import ANSWER_WORDS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained VLM on LLaVA-format VQA data (exact match, batched greedy)",
        description="Exact-match accuracy (first word unless the bundle or --answer-word says otherwise, case "
        "and punctuation folded) of a trained VLM on LLaVA-format Q/A data, per question type when samples "
        "carry a 'type'.")
    parser.add_argument("checkpoint", help="inference bundle, run folder, or `movekd export` folder")
    parser.add_argument("--data", required=True, help="LLaVA JSON (or asset:easyvqa/test.json)")
    parser.add_argument("--image-root", help="folder image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--max-samples", type=int, default=None, help="seeded subset of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-by", choices=("question", "image"), default="question",
                        help="draw the --max-samples subset by question, or by image with all its questions "
                        "(they then share the image's prompt prefix)")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="run every question's prompt on its own instead of each image's common prefix once "
                        "(same answers up to float rounding; slower where images have several questions)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="tokens generated per answer at most (default 16; generation stops once every "
                        "answer of a batch has ended, so short answers cost no more)")
    parser.add_argument("--answer-word", choices=ANSWER_WORDS,
                        help="which word of a generated answer is compared with the reference: first, last (answers "
                        "after a rationale, as the demo's yes/no answers 'a blue circle; not red: yes') or all "
                        "(default: the bundle's, i.e. its training config's eval.answer_word, else first)")
    parser.add_argument("--prior-data", help="training JSON for the answer-prior baseline")
    parser.add_argument("--image-aspect-ratio", choices=("stretch", "square", "pad", "anyres"),
                        help="how images become squares, or anyres: LLaVA-NeXT tiles (default: as the bundle was "
                        "trained; LLaVA evaluates "
                        "with pad)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--predictions", metavar="FILE",
                        help="also write one JSON line per question (id, type, prediction, answer, correct)")
    parser.add_argument("--no-fold", action="store_true",
                        help="run MoLE experts as LoRA (less memory) instead of folded per-expert FFN copies "
                        "(default: folded where they can be pre-packed, i.e. on CPU)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from movekd.data.llava_json import read_llava_file
    from movekd.inference import load_trained
    from movekd.train.build import resolve_path
    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import run_eval

    # A missing or malformed data file fails before the model is loaded.
    for data in filter(None, [args.data, args.prior_data]):
        read_llava_file(resolve_path(data))
    loaded = load_trained(args.checkpoint, fold_experts=False if args.no_fold else "auto")
    config = EvalConfig(data=args.data, image_root=args.image_root, max_samples=args.max_samples, seed=args.seed,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, prior_data=args.prior_data,
                        image_aspect_ratio=args.image_aspect_ratio, sample_by=args.sample_by,
                        share_image_prefix=not args.no_share_prefix, answer_word=args.answer_word)
    result = run_eval(loaded, config, return_predictions=bool(args.predictions))
    if args.predictions:
        records = result.pop("predictions")
        atomic_write_text(args.predictions, "".join(json.dumps(r) + "\n" for r in records))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"accuracy {result['accuracy']:.3f} ({result['correct']}/{result['n']}, {result['skipped']} skipped)")
    for kind, value in sorted(result["per_type"].items()):
        prior = result.get("prior", {}).get("per_type", {}).get(kind)
        extra = f"   answer prior {prior:.3f}" if prior is not None else ""
        print(f"  {kind:<8} {value['accuracy']:.3f} (n={value['n']}){extra}")
    return 0
