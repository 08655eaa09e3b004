"""``movekd viz RUN IMAGE... --out DIR``: pictures of what a run distilled."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "viz",
        help="pictures of a run: token weights, experts, PCA features, teacher weights, training curves",
        description="For each IMAGE: the CLIP-role teacher's token weight (Eq. 3) over the image, the student's "
                    "routed expert per token per MoLE layer, PCA maps (3 components as RGB) of student and teacher "
                    "features. With --data: the teacher-weight distribution (Eq. 4, needs a checkpoint holding the "
                    "adapters) and expert usage per layer over its images. From RUN/metrics.jsonl: the training "
                    "curves of every loss term. RUN is a run folder (final/ and config.json from movekd train).",
    )
    p.add_argument("run", metavar="RUN", help="run folder (runs/NAME)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--data", help="LLaVA-format JSON: dataset statistics over its images")
    p.add_argument("--image-root", help="image folder of --data (default: the JSON's folder)")
    p.add_argument("--max-images", type=int, default=200, help="images of --data to use (default 200)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from movekd.viz import visualize

    written = visualize(args.run, args.images, args.out, data=args.data, image_root=args.image_root,
                        max_images=args.max_images, progress=lambda m: print(m, file=sys.stderr))
    for name, path in written.items():
        print(f"{name:<28} {path}")
    return 0
