"""The `polyglu` console command: one entry point with subcommands, like `accelerate` or `trl`."""

import argparse
import sys

from .configuration_polyglu import FFN_TYPES


def _add_demo_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="Build, train briefly, generate, save and reload a tiny model (no download).",
        description="Runs the whole life of a small model on an embedded default: no download, a few seconds on a CPU.",
    )
    parser.add_argument("--ffn-type", default="polyglu", choices=FFN_TYPES, help="feed-forward variant (default polyglu)")
    parser.add_argument("--output-dir", default="outputs/demo", help="where the model is saved (default outputs/demo)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(args.ffn_type, args.output_dir, args.steps, args.seed, overwrite=args.overwrite)
    return 0 if summary["cache_matches"] and summary["remote_code_max_abs_diff"] == 0.0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyglu", description="Activation-mixing feed-forward layers for Qwen3-style models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(subparsers)
    return parser


class UserFacingError(Exception):
    """An expected failure (bad input, existing destination): reported in one line, without a traceback."""


def main(argv=None) -> int:
    from .atomic_output import DestinationExistsError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UserFacingError, DestinationExistsError, ValueError) as error:
        print(f"polyglu {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
