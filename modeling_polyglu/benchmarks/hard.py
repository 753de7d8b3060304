"""The `hard` suite: one FFN block at inference, the same module with soft and with hard routing."""

import torch

from ..modeling_polyglu import PolyGLUMLP
from .harness import markdown_table, paired_ratio, progress, ratio, run_interleaved, summarize_metric, timed
from .models import FFN_CASES, FFN_CASES_QUICK, ffn_config, project_mlp

DEFAULT_REPEATS = 7

# (label, ffn_type, config overrides) of the routed mixers whose hard routing is compared with their soft routing
HARD_ROUTING_CONTENDERS = (
    ("polyglu", "polyglu", {}),
    ("polyglu[token]", "polyglu", {"routing_pooling": "token"}),
    ("moa", "moa", {}),
    ("dualglu", "dualglu", {}),
    ("dualglu[learned_static]", "dualglu", {"dualglu_mixing": "learned_static"}),
)

COLUMNS = [
    ("mixer", "contender", ""), ("soft ms", "soft_ms", ".1f"), ("hard ms", "hard_ms", ".1f"),
    ("spread", "hard_rel_spread", "pct"), ("hard / soft", "hard_vs_soft", ".2f"), ("paired", "hard_vs_soft_paired", ".2f"),
    ("soft / swiglu", "soft_vs_swiglu", ".2f"),
]


def _hard_case(hidden, intermediate, batch, tokens, repeats, warmup, ffn_types, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, hidden, generator=generator)
    modules = {"swiglu": project_mlp(hidden, intermediate, "swiglu", generator)}
    pairs = []
    for label, ffn_type, overrides in HARD_ROUTING_CONTENDERS:
        if ffn_type not in ffn_types:
            continue
        soft = project_mlp(hidden, intermediate, ffn_type, generator, **overrides)
        hard = PolyGLUMLP(ffn_config(hidden, intermediate, ffn_type, routing_hard=True, **overrides), 0)
        hard.load_state_dict(soft.state_dict())  # the same weights and routers: only the mixing differs
        modules[label], modules[f"{label}[hard]"] = soft, hard
        pairs.append(label)

    def inference(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    contenders = {}
    for name, module in modules.items():
        module.eval()
        contenders[name] = timed(inference(module), torch.device("cpu"))
    times = summarize_metric(run_interleaved(contenders, repeats, warmup))
    rows = []
    for label in pairs:
        soft, hard = times[label], times[f"{label}[hard]"]
        rows.append({
            "contender": label,
            "soft_ms": soft["median"] * 1e3,
            "hard_ms": hard["median"] * 1e3,
            "hard_rel_spread": hard["rel_spread"],
            "hard_vs_soft": ratio(hard["median"], soft["median"]),
            "hard_vs_soft_paired": paired_ratio(hard["samples"], soft["samples"]),
            "soft_vs_swiglu": ratio(soft["median"], times["swiglu"]["median"]),
            "soft_samples_ms": [value * 1e3 for value in soft["samples"]],
            "hard_samples_ms": [value * 1e3 for value in hard["samples"]],
        })
    return {
        "case": f"float32 cpu d={hidden} F={intermediate} tokens={batch}x{tokens}",
        "hidden_size": hidden, "intermediate_size": intermediate, "batch": batch, "tokens": tokens,
        "swiglu_ms": times["swiglu"]["median"] * 1e3,
        "rows": rows,
    }


def run(args) -> dict:
    cases = FFN_CASES_QUICK if args.quick else FFN_CASES
    results = []
    for hidden, intermediate, batch, tokens in cases:
        progress(args, f"hard: float32 cpu d={hidden} F={intermediate} {batch}x{tokens}")
        results.append(_hard_case(hidden, intermediate, batch, tokens, args.repeats, args.warmup, args.ffn_types,
                                  args.seed))
    return {
        "description": "FFN block forward at inference (eval mode, no_grad), the same module with routing_hard "
                       "True and False. Hard routing evaluates one activation per neuron (static choice, grouped) "
                       "or per token (MoA, DualGLU), or selects per element (PolyGLU) without the softmax.",
        "cases": results,
    }


def render(result: dict) -> list:
    return [f"### hard: {case['case']} (forward at inference, soft vs hard routing; swiglu "
            f"{case['swiglu_ms']:.1f} ms)\n\n" + markdown_table(case["rows"], COLUMNS) for case in result["cases"]]
