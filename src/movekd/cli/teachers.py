"""``movekd teachers``: list the teacher sources (registry) and the presets.

With ``--meta`` every preset is built on the meta device (no weights, no memory) to report its
token grid, channels, parameters and forward GFLOPs.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "teachers",
        help="list teacher sources and presets",
        description="List the registered teacher sources and the teacher presets (paper v1.0/v1.1, embedded). "
                    "--meta builds each preset on the meta device to report tokens x channels, parameters "
                    "and GFLOPs without downloading anything.",
    )
    p.add_argument("names", nargs="*", help="only these presets (default: all)")
    p.add_argument("--meta", action="store_true", help="build on the meta device: tokens, channels, params, GFLOPs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)


def _rows(names: list[str], meta: bool) -> list[dict]:
    from movekd.teachers import describe_teacher, get_preset

    rows = []
    for name in names:
        spec = get_preset(name)
        row = {"name": spec.name, "source": spec.source, "model": spec.model, "image_size": spec.image_size,
               "resize": spec.resize, "layer": spec.layer, "cls_attention": spec.provides_cls_attention}
        if meta:
            info = describe_teacher(spec)
            row.update(tokens=info["tokens"], channels=info["channels"], grid=list(info["grid"]),
                       params=info["params"], gflops=round(info["gflops"], 1))
        rows.append(row)
    return rows


def _run(args: argparse.Namespace) -> int:
    from movekd.teachers import TEACHER_SETS, list_presets, list_teachers

    rows = _rows(args.names or list_presets(), args.meta)
    if args.json:
        print(json.dumps({"sources": list_teachers(), "sets": {k: list(v) for k, v in TEACHER_SETS.items()},
                          "presets": rows}, indent=1))
        return 0
    print("sources: " + ", ".join(list_teachers()))
    print("sets:    " + "; ".join(f"{k} = {', '.join(v)}" for k, v in TEACHER_SETS.items()))
    header = f"{'preset':<21} {'source':<10} {'input':>10}  {'layer':>5}"
    if args.meta:
        header += f"  {'tokens x channels':>17}  {'params':>8}  {'GFLOPs':>8}"
    print(header)
    for r in rows:
        line = f"{r['name']:<21} {r['source']:<10} {r['image_size']:>4} {r['resize'].split('_')[1]:>5}  {str(r['layer']):>5}"
        if args.meta:
            line += f"  {r['tokens']:>8} x {r['channels']:<6}  {r['params'] / 1e6:>7.1f}M  {r['gflops']:>8.1f}"
        print(line)
    return 0
