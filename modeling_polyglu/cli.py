"""The `polyglu` console command: one entry point with subcommands, like `accelerate` or `trl`."""

import argparse
import errno
import importlib.util
import signal
import sys
import threading
from pathlib import Path

from .configuration_polyglu import FFN_TYPES

# what `pip install "polyglu[train]"` adds; the model, convert and bench need none of it
TRAINING_EXTRA_MODULES = frozenset({"trl", "peft", "accelerate", "datasets", "matplotlib", "tensorboard"})


def positive_int(text: str) -> int:
    """argparse type of counts that must be at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _add_demo_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="Pretrain a tiny Qwen3, retrofit it to PolyGLU, fine-tune with TRL + routing monitor, reload with remote code.",
        description="The whole pipeline on an embedded default (no download; a few minutes on 2 CPU cores).",
    )
    parser.add_argument("--ffn-type", default="polyglu", choices=FFN_TYPES, help="variant to retrofit to (default polyglu)")
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written (default outputs/demo)")
    parser.add_argument("--pretrain-steps", type=positive_int, default=400, help="steps of base-model pretraining (default 400)")
    parser.add_argument("--sft-steps", type=positive_int, default=150, help="SFT steps (default 150)")
    parser.add_argument("--base-model", help="a Qwen3 checkpoint to start from instead of pretraining the tiny one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    _require_training_extras()  # its fine-tuning stage needs them: fail before the pretraining, not after
    run_demo(
        args.output_dir, args.ffn_type, args.pretrain_steps, args.sft_steps, args.seed, base_model=args.base_model,
        overwrite=args.overwrite,
    )
    return 0


def _add_convert_parsers(subparsers):
    convert = subparsers.add_parser("convert", help="Convert checkpoints into PolyGLU-family checkpoints.")
    kinds = convert.add_subparsers(dest="source_kind", required=True)

    qwen3 = kinds.add_parser(
        "qwen3",
        help="Retrofit a transformers Qwen3 checkpoint into any ffn_type.",
        description="Streams a Qwen3 safetensors checkpoint shard by shard into a PolyGLU-family checkpoint whose "
        "routers start near the source function; measures the deviation on probe text.",
    )
    qwen3.add_argument("--src", required=True, help="Qwen3 checkpoint directory (safetensors, single or sharded)")
    qwen3.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    qwen3.add_argument("--ffn-type", required=True, choices=FFN_TYPES)
    qwen3.add_argument("--layers", default="all", help="'all' (default), 'top:N', 'bottom:N' or indices like '0,2,10-13'")
    qwen3.add_argument(
        "--router-init-activation", default="silu",
        help="activation the routers prefer at the start (default silu = SwiGLU's); 'none' for unbiased routers",
    )
    qwen3.add_argument(
        "--router-init-strength", type=float, default=8.0,
        help="logit preference for it (default 8: ~0.1%% weight elsewhere for K=4, gradients still reach the router)",
    )
    qwen3.add_argument("--probe-file", help="text file to measure the deviation on (default: built-in text)")
    qwen3.add_argument("--no-verify", action="store_true",
                       help="skip the comparison with transformers' Qwen3 (run one decoder layer at a time)")
    qwen3.add_argument("--seed", type=int, default=0, help="seed of the new router parameters")
    qwen3.add_argument("--overwrite", action="store_true")
    qwen3.set_defaults(handler=_run_convert_qwen3)

    reference = kinds.add_parser(
        "polychromatic",
        help="Import a PolychromaticLM checkpoint of the reference PolyGLU implementation.",
        description="Imports a reference .pt (portable or SFT) or .safetensors checkpoint; dims are inferred from shapes.",
    )
    reference.add_argument("--src", required=True, help="reference checkpoint: .pt or .safetensors")
    reference.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    reference.add_argument("--tokenizer", help="directory with the tokenizer files to copy (Qwen3-0.6B-Base for the release)")
    reference.add_argument("--tau", type=float, help="routing τ when the file does not store it (.safetensors)")
    reference.add_argument("--max-position-embeddings", type=int, help="context length when the file has no RoPE tables (default 4096)")
    reference.add_argument(
        "--routing-pooling", default="sequence", choices=("sequence", "causal", "token"),
        help="sequence (default) reproduces the reference; causal is cacheable but changes the function",
    )
    reference.add_argument("--overwrite", action="store_true")
    reference.set_defaults(handler=_run_convert_polychromatic)


def _run_convert_qwen3(args) -> int:
    from .conversion.qwen3 import convert_qwen3

    preferred = None if args.router_init_activation == "none" else args.router_init_activation
    convert_qwen3(
        args.src, args.dst, args.ffn_type, layers=args.layers, router_init_activation=preferred,
        router_init_strength=args.router_init_strength, verify=not args.no_verify, probe_file=args.probe_file,
        overwrite=args.overwrite, seed=args.seed,
    )
    return 0


def _run_convert_polychromatic(args) -> int:
    from .conversion.polychromatic import convert_polychromatic

    convert_polychromatic(
        args.src, args.dst, tokenizer=args.tokenizer, tau=args.tau,
        max_position_embeddings=args.max_position_embeddings, routing_pooling=args.routing_pooling,
        overwrite=args.overwrite,
    )
    return 0


def _add_inspect_parser(subparsers):
    parser = subparsers.add_parser(
        "inspect",
        help="Routing statistics and plots of a saved checkpoint (the routing it applies, not softmax(α)).",
        description="Measures the applied routing of a checkpoint on probe text; writes routing_report.json and a heatmap.",
    )
    parser.add_argument("model_dir", help="a saved PolyGLU-family checkpoint directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="text file, one probe example per line")
    source.add_argument("--dataset", help="JSONL file/dir (messages, prompt/completion or text) or a Hub dataset name")
    parser.add_argument("--output-dir", help="where to write the report (default: MODEL_DIR/routing_inspect)")
    parser.add_argument("--limit", type=positive_int, default=64, help="number of probe examples (default 64)")
    parser.add_argument("--trust-remote-code", action="store_true", help="load with the checkpoint's own code")
    parser.set_defaults(handler=_run_inspect)


def _run_inspect(args) -> int:
    from .training.inspect import inspect_checkpoint

    inspect_checkpoint(args.model_dir, args.text, args.dataset, args.output_dir, args.limit, trust_remote_code=args.trust_remote_code)
    return 0


SELF_PARSING_COMMANDS = {
    "bench": "Speed and memory ratios against SwiGLU, measured in one process (`polyglu bench --help`).",
    "sft": "Fine-tune with TRL's SFTTrainer plus routing monitoring (`polyglu sft --help` lists the arguments).",
    "pretrain": "Pretrain a preset or config from scratch with the HF Trainer (`polyglu pretrain --help`).",
    "compare": "From-scratch comparison of ffn types over seeds with paired confidence intervals (`polyglu compare --help`).",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyglu", description="Activation-mixing feed-forward layers for Qwen3-style models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(subparsers)
    _add_convert_parsers(subparsers)
    _add_inspect_parser(subparsers)
    for name, help_text in SELF_PARSING_COMMANDS.items():  # listed in --help; main() hands them their arguments
        subparsers.add_parser(name, add_help=False, help=help_text)
    return parser


class UserFacingError(Exception):
    """An expected failure (bad input, existing destination): reported in one line, without a traceback."""


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _unwind_on_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        # a terminated run unwinds like Ctrl-C, so staged output is removed on the way out
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


def describe_os_error(error: OSError) -> str:
    """One line for a failed read or write, with the fix for the usual causes (full or read-only disk)."""
    hints = {
        errno.ENOSPC: "free disk space or choose another destination",
        errno.EROFS: "the filesystem is read-only; choose a writable destination",
        errno.EACCES: "no permission; choose a writable destination",
        errno.EPERM: "no permission; choose a writable destination",
    }
    text = str(error)
    hint = hints.get(error.errno)
    if hint is None and ("No space left" in text or "StorageFull" in text):  # safetensors' wrapped I/O errors
        hint = hints[errno.ENOSPC]
    return f"{text}; {hint}" if hint else text


def _require_training_extras() -> None:
    """Raise ModuleNotFoundError (main() reports it in one line) where a module of the training extras is missing."""
    for name in sorted(TRAINING_EXTRA_MODULES):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in TRAINING_EXTRA_MODULES:
            raise
        command = f"polyglu {argv[0]}" if argv else "polyglu"
        print(f"{command}: error: {missing} is not installed, and {command} needs the training extras: "
              "pip install 'polyglu[train]' (in a checkout: pip install -e '.[train]')", file=sys.stderr)
        return 2


def check_recipe_files(argv: list) -> None:
    """Every `--config FILE.yaml` exists and parses; TRL's and transformers' parsers read it with a traceback."""
    import yaml

    from .training.pretrain import RECIPE_SUFFIXES

    values = [argv[index + 1] for index, item in enumerate(argv[:-1]) if item == "--config"]
    values += [item.split("=", 1)[1] for item in argv if item.startswith("--config=")]
    for value in (value for value in values if Path(value).suffix in RECIPE_SUFFIXES):
        if not Path(value).is_file():
            raise ValueError(f"--config {value}: no such file; pass a YAML recipe (see recipes/*.yaml).")
        try:
            yaml.safe_load(Path(value).read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"--config {value}: not valid YAML{where} ({problem}); fix the file.") from None


def _dispatch(argv: list) -> int:
    from .conversion.staging import DestinationExistsError

    if argv[:1] == ["bench"]:  # the benchmark suite has its own parser
        from .benchmarks.runner import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["sft"]:  # TRL's own parser takes every remaining argument (and --config YAML files)
        from .training.sft import main as sft_main

        _unwind_on_sigterm()
        try:
            check_recipe_files(argv[1:])
            return sft_main(argv[1:])
        except ValueError as error:
            print(f"polyglu sft: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"polyglu sft: error: {describe_os_error(error)}", file=sys.stderr)
            return 1
    if argv[:1] in (["pretrain"], ["compare"]):  # their own parsers (TrainingArguments flags, --config YAML files)
        from .training.compare import main as compare_main
        from .training.pretrain import main as pretrain_main

        try:
            check_recipe_files(argv[1:])
            return (pretrain_main if argv[0] == "pretrain" else compare_main)(argv[1:])
        except ValueError as error:
            print(f"polyglu {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    _unwind_on_sigterm()
    try:
        return args.handler(args)
    except (UserFacingError, DestinationExistsError, ValueError) as error:
        print(f"polyglu {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full or read-only disk: staged output was already removed
        print(f"polyglu {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"polyglu {args.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
