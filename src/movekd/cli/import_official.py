"""``movekd import-official DIR OUT``: an official MoVE-KD checkpoint (``move_llava_llama``) as a bundle."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-official", help="convert an official MoVE-KD checkpoint (move_llava_llama) into a movekd bundle",
        description="Convert a checkpoint written by the official MoVE-KD code (e.g. jiaojuncao/MoVE-KD-7b-v1.0, "
        "downloaded to DIR) into a movekd bundle: evaluate, chat with, export or fine-tune it with movekd. The "
        "encoder adapters (training only) are dropped.")
    parser.add_argument("checkpoint", metavar="DIR", help="official checkpoint folder (config.json, weights, tokenizer)")
    parser.add_argument("out", metavar="OUT", help="bundle folder to write")
    parser.add_argument("--vision-config", metavar="CONFIG.json",
                        help="CLIP vision architecture (a config.json or HF folder), when the checkpoint's "
                        "mm_vision_tower is neither openai/clip-vit-large-patch14-336 nor a local folder")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from movekd.convert import import_official

    out = import_official(args.checkpoint, args.out, vision_config=args.vision_config, overwrite=args.overwrite,
                          progress=lambda message: print(message, file=sys.stderr))
    print(f"imported {args.checkpoint} -> {out} (movekd bundle)")
    return 0
