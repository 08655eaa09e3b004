"""``movekd export RUN_OR_BUNDLE OUT --format hf-llava [--merge none|mean|usage] [--calib DATA.json]``."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a trained VLM to the Hugging Face LLaVA format (transformers, lmms-eval, hub)",
        description="Write RUN_OR_BUNDLE as an HF LlavaForConditionalGeneration folder with its AutoProcessor "
        "(image preprocessing, <image> token, the trained chat template) and a model card. --merge none keeps "
        "the routed MoLE student (exact; loading needs `import movekd`); --merge mean|usage folds the experts "
        "into plain FFNs so the folder loads in stock transformers (lossy: the cost is measured and printed).")
    parser.add_argument("checkpoint", help="inference bundle or run folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--format", default="hf-llava", choices=["hf-llava", "hf-llava-next"],
                        help="hf-llava: LlavaForConditionalGeneration; hf-llava-next: LlavaNextForConditionalGeneration "
                        "(AnyRes tiling, for bundles trained with image_aspect_ratio: anyres)")
    parser.add_argument("--merge", default="none", choices=["none", "mean", "usage"],
                        help="none: exact (movekd_student type); mean: average of the experts; usage: experts "
                        "weighted by their measured usage on --calib (default: none)")
    parser.add_argument("--calib", metavar="DATA.json", help="LLaVA JSON whose images measure expert usage "
                        "(needed by --merge usage) and, without --eval-data, the feature distance")
    parser.add_argument("--calib-images", type=int, default=256, help="at most this many calibration images")
    parser.add_argument("--eval-data", metavar="DATA.json",
                        help="held-out LLaVA Q/A data: measure the merge's accuracy cost on it")
    parser.add_argument("--eval-samples", type=int, default=500, help="seeded subset of --eval-data (default 500)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="then upload the folder to this Hugging Face hub model repo (created if needed; needs a "
                        "token with write access: `hf auth login` or HF_TOKEN, checked before the export runs)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from movekd.errors import OptionError
    from movekd.export import export_hf_llava
    from movekd.export.hub import hub_token, push_to_hub

    if args.private and not args.push_to_hub:
        raise OptionError("--private only applies with --push-to-hub REPO")
    token = hub_token(args.push_to_hub) if args.push_to_hub else None  # fail before a long export
    result = export_hf_llava(args.checkpoint, args.out, merge=args.merge, calib=args.calib,
                             eval_data=args.eval_data, eval_samples=args.eval_samples,
                             calib_images=args.calib_images, overwrite=args.overwrite, format=args.format,
                             progress=lambda message: print(message, file=sys.stderr))
    print(f"exported {args.checkpoint} -> {result.path} ({args.format}, merge {result.merge}, "
          f"{result.num_image_tokens} image tokens, vision_feature_layer {result.vision_feature_layer})")
    cost = result.cost
    if "bundle" in cost:
        print(f"merge cost on {cost['eval_data']}: accuracy {cost['bundle']['accuracy']:.3f} (bundle) -> "
              f"{cost['merged']['accuracy']:.3f} (merged {result.merge}), n={cost['merged']['n']}")
    elif "feature_distance" in cost:
        d = cost["feature_distance"]
        print(f"merge cost: student tokens relative L2 {d['relative_l2']:.4f}, cosine {d['cosine']:.4f} "
              f"({d['tokens']} tokens)")
    elif result.merge != "none":
        print("merge cost not measured: pass --eval-data or --calib")
    if args.push_to_hub:
        url = push_to_hub(result.path, args.push_to_hub, private=args.private, token=token)
        print(f"pushed {result.path} to {url}{' (private)' if args.private else ''}")
    return 0
