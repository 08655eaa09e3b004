"""``movekd chat CHECKPOINT --image IMG "question"``."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="ask a trained VLM a question about an image",
                                   description="Greedy answer from the student-only VLM (no teachers loaded).")
    parser.add_argument("checkpoint", help="inference bundle or run folder")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--image-aspect-ratio", choices=("stretch", "square", "pad", "anyres"),
                        help="how the image becomes a square, or anyres: LLaVA-NeXT tiles (bundles trained with it); "
                        "default: as the bundle was trained")
    parser.add_argument("--no-fold", action="store_true",
                        help="run MoLE experts as LoRA (less memory) instead of folded per-expert FFN copies "
                        "(default: folded where they can be pre-packed, i.e. on CPU)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from movekd.inference import answer, load_trained, read_query_image, resolve_bundle

    resolve_bundle(args.checkpoint)  # a wrong path or a bad image fails before the model is loaded
    read_query_image(args.image)
    loaded = load_trained(args.checkpoint, fold_experts=False if args.no_fold else "auto")
    if args.image_aspect_ratio:
        loaded.image_aspect_ratio = args.image_aspect_ratio
    print(answer(loaded, args.image, args.question, args.max_new_tokens))
    return 0
