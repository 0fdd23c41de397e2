"""`hf-deelbo show`: print the learned hyperparameters of a local directory or Hub repo."""

from __future__ import annotations

import json
import math

from .common import ArgumentParser, read_deelbo


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="hf-deelbo show", description="Print the learned hyperparameters.", allow_abbrev=False
    )
    parser.add_argument("path_or_repo_id", help="Output directory or Hub repo id.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--token", default=None)
    parser.add_argument("--json", action="store_true", help="Print config.deelbo as JSON.")
    return parser


def main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    deelbo = read_deelbo(args.path_or_repo_id, args.token, args.revision).to_dict()
    if args.json:
        print(json.dumps(deelbo, indent=2, sort_keys=True))
        return 0
    width = max(len(k) for k in deelbo)
    for key, value in sorted(deelbo.items()):
        shown = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else value
        print(f"{key:<{width}}  {shown}")
    return 0
