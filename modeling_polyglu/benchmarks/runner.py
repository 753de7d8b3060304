"""The `polyglu bench` command: parse the arguments, run the selected suites, print markdown tables, write JSON.

Suites (``--suite``), one module each:

* ``ffn``: one feed-forward block, forward + backward, for every ``ffn_type`` (project ``PolyGLUMLP``) against the
  project's swiglu, transformers' eager ``Qwen3MLP`` and a reference-style PolyGLU (all K activations stacked into
  ``[B, T, F, K]``, whole-sequence mean pooling, Gumbel softmax), plus ``mixing_backend="naive"`` and other polyglu
  variants; also the bytes autograd saves for backward.
* ``hard``: one feed-forward block at inference, soft against hard routing.
* ``step``: one training step (forward + backward + AdamW) of a small causal LM per ``ffn_type``, against swiglu.
* ``decode``: prefill a prompt, then greedy decoding with the KV cache, per ``ffn_type``, against swiglu.
* ``generate``: ``model.generate`` with the KV cache against a reference-style loop without cache (the full
  sequence is re-run for every new token), for a causal-routed polyglu model, at several generation lengths.
* ``convert``: peak memory of streaming conversion against the shard size.
* ``kernel``: the mixing op alone on a GPU, forward + backward, against Liger's fused SiLU·mul and over a sweep of
  the Triton programs' tile sizes (in Triton's interpreter elsewhere, measuring nothing).

How the figures are measured: see harness.py. Results are printed as markdown tables and written as JSON
(``--json``, default ``$POLYGLU_BENCH_DIR`` or ``~/.cache/polyglu/bench/<suite>.json``). ``--quick`` is a smoke
test, and its tables say so.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ..cli import positive_int
from ..configuration_polyglu import FFN_TYPES
from . import convert, decode, ffn, generate, hard, kernel, step
from .harness import benchmark_environment, environment_info, load_average, write_json

SUITE_MODULES = {"ffn": ffn, "hard": hard, "step": step, "decode": decode, "generate": generate, "convert": convert,
                 "kernel": kernel}
SUITES = tuple(SUITE_MODULES)
QUICK_REPEATS = 1
SMOKE_TEST_NOTE = "tiny sizes, one repetition, not results; ratios and spreads here mean nothing"


def default_json_path(suite: str, quick: bool) -> Path:
    """Where results go without --json: $POLYGLU_BENCH_DIR, else the user cache (never the working directory)."""
    root = os.environ.get("POLYGLU_BENCH_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polyglu" / "bench"
    return Path(root) / f"{suite}{'-quick' if quick else ''}.json"


def render(results: dict) -> str:
    meta = results["meta"]
    parts = [
        f"PolyGLU benchmarks — {meta['date_utc']}, {meta['cpu']} ({meta['cpu_count']} cores, {meta['threads']} "
        f"thread(s)), torch {meta['torch']}, transformers {meta['transformers']}, repeats {meta['repeats']}"
        f"{' (quick sizes)' if meta['quick'] else ''}, fused mixing kernels compiled on CPU: "
        f"{meta['mixing_kernels_compiled_cpu']}, C++ CPU kernel: {meta.get('cpu_mixing_kernel')}; spread = ±half of (max - min) / median; paired = median over "
        "repetitions of the per-repetition ratio."
    ]
    for name, module in SUITE_MODULES.items():
        if name in results["suites"]:
            tables = module.render(results["suites"][name])
            if meta["quick"]:  # tiny sizes, one repetition: the numbers show that the suite runs, nothing more
                tables = [table.replace("### ", f"### SMOKE TEST (--quick: {SMOKE_TEST_NOTE}) — ", 1) for table in tables]
            parts.extend(tables)
    if meta.get("recompile_warnings"):
        parts.append("torch._dynamo recompilation warnings (some fused kernels may have fallen back to eager):\n"
                     + "\n".join(f"* {message}" for message in meta["recompile_warnings"]))
    return "\n\n".join(parts) + "\n"


def _csv_ints(text: str) -> tuple:
    values = [value.strip() for value in text.split(",") if value.strip()]
    if not values or not all(value.isdigit() and int(value) >= 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return tuple(int(value) for value in values)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _csv_ffn_types(text: str) -> tuple:
    values = tuple(value.strip() for value in text.split(",") if value.strip())
    unknown = [value for value in values if value not in FFN_TYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ffn_type(s) {unknown}; choose from {', '.join(FFN_TYPES)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyglu bench",
        description="Interleaved, single-threaded benchmarks reported as ratios (markdown table + JSON). "
                    "No timing is asserted; on a shared machine compare ratios, not absolute times.",
    )
    parser.add_argument("--suite", choices=SUITES + ("all",), default="ffn",
                        help="ffn (default): FFN block fwd+bwd and saved bytes; hard: soft vs hard routing at "
                             "inference; step: training step; convert: peak memory of streaming conversion; decode: cached "
                             "per-token latency; generate: cached generate() vs no-cache loop; kernel: the mixing op alone "
                             "on a GPU, with a sweep of the Triton tile sizes; all: every suite")
    parser.add_argument("--repeats", type=int,
                        help="interleaved repetitions per contender (default: ffn 5, hard 7, step 3, decode 5, "
                             "generate 3, kernel 5; convert always runs once; "
                             f"{QUICK_REPEATS} with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny sizes, one repetition; checks that the suites run, measures nothing")
    parser.add_argument("--json", dest="json_path",
                        help="output JSON (default $POLYGLU_BENCH_DIR or ~/.cache/polyglu/bench: <suite>.json, "
                             "<suite>-quick.json for --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads during the run (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="step/decode/generate device (auto: cuda if available); ffn runs fp32 CPU unless "
                             "--device cuda, and bf16 CUDA (GPU sizes, Liger and Triton rows) unless --device cpu")
    parser.add_argument("--ffn-types", type=_csv_ffn_types, default=FFN_TYPES,
                        help="comma-separated ffn_types to compare (default: all; swiglu is always included)")
    parser.add_argument("--decode-tokens", type=positive_int, help=f"new tokens of the decode suite (default {decode.DECODE_TOKENS})")
    parser.add_argument("--generate-lengths", type=_csv_ints,
                        help="new-token counts of the generate suite (default 64,128,256)")
    parser.add_argument("--convert-total-gb", type=_positive_float,
                        help=f"synthetic checkpoint size of the convert suite (default {convert.CONVERT_TOTAL_GB:g})")
    parser.add_argument("--convert-shard-mb", type=_csv_ints,
                        help="shard sizes of the convert suite (default 256,1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    return parser


def run_benchmarks(args) -> dict:
    """Run the selected suites; returns {"meta": ..., "suites": {name: result}}."""
    suites = SUITES if args.suite == "all" else (args.suite,)
    if "swiglu" not in args.ffn_types:
        args.ffn_types = ("swiglu",) + tuple(args.ffn_types)
    with benchmark_environment(args.threads) as watcher:
        meta = environment_info(args.threads)
        results = {}
        for suite in suites:
            suite_args = argparse.Namespace(**vars(args))
            if suite_args.repeats is None:
                suite_args.repeats = QUICK_REPEATS if args.quick else SUITE_MODULES[suite].DEFAULT_REPEATS
            started = time.perf_counter()
            results[suite] = SUITE_MODULES[suite].run(suite_args)
            results[suite]["repeats"] = suite_args.repeats
            results[suite]["wall_s"] = time.perf_counter() - started
        meta.update({
            "suite": args.suite,
            "repeats": args.repeats if args.repeats is not None else ("per suite" if args.suite == "all" else
                                                                       results[suites[0]]["repeats"]),
            "warmup": args.warmup,
            "quick": bool(args.quick),
            "seed": args.seed,
            "load_average_end": load_average(),
            "recompile_warnings": list(watcher.messages),
        })
    return {"meta": meta, "suites": results}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print("polyglu bench: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.warmup < 0 or args.threads < 1:
        print("polyglu bench: error: --warmup must be >= 0 and --threads >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("polyglu bench: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.suite == "kernel" and not (torch.cuda.is_available() and args.device != "cpu") and not kernel.interpreted():
        print("polyglu bench: error: --suite kernel measures the Triton programs on a CUDA device, and there is "
              "none here (TRITON_INTERPRET=1 runs it in Triton's interpreter, which measures nothing)", file=sys.stderr)
        return 2
    results = run_benchmarks(args)
    print(render(results))
    path = Path(args.json_path) if args.json_path else default_json_path(args.suite, args.quick)
    write_json(results, path)
    if not args.silent:
        print(f"[polyglu bench] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
