"""``movekd cache CONFIG [--stage N] [--out DIR]``: run the teachers once, store their features."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="precompute the teachers' features of a config's stages (fp16 safetensors shards)",
        description="Run the config's frozen teachers once over the images of its stages (default: every stage "
                    "with KD; --stage N for one) and store what the KD loss needs: every teacher's tokens and, "
                    "for the CLIP-role teacher, its CLS token and token weight (Eq. 3). Training reads the folder "
                    "when the config sets teacher_cache_dir (e.g. --set teacher_cache_dir=DIR); a cache written "
                    "with other teacher settings or images is refused, a corrupt shard is detected.",
    )
    p.add_argument("config", help="YAML path or preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--stage", type=int, action="append", help="stage index (repeatable; default: all with KD)")
    p.add_argument("--out", help="cache folder (default: the config's teacher_cache_dir, else RUN_DIR/teacher_cache)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from movekd.train.config import load_config
    from movekd.train.feature_cache import write_teacher_cache

    config = load_config(args.config, args.overrides)
    out = args.out or config.teacher_cache_dir or str(config.run_dir / "teacher_cache")

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\rteachers: {done}/{total} images", end="\n" if done == total else "", file=sys.stderr)

    manifest = write_teacher_cache(config, out, stages=args.stage, shard_size=args.shard_size, progress=progress)
    n = len(manifest["images"])
    print(f"{out}: {n} images, {len(manifest['shards'])} shards")
    total = 0
    for name, size in manifest["bytes_per_image"].items():
        total += size
        print(f"  {name:<24} {size / 1024:9.1f} KiB per image  {size * n / 2**20:9.1f} MiB")
    print(f"  {'total':<24} {total / 1024:9.1f} KiB per image  {total * n / 2**20:9.1f} MiB")
    print(f"train with: --set teacher_cache_dir={out}")
    return 0
