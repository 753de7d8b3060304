"""KV-cache generation: cached decoding equals recomputation for every kind of router, and the cache carries (and
reorders) the causal routing state."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from modeling_polyglu import PolyGLUCache, PolyGLUStaticCache
from modeling_polyglu.modeling_polyglu import CACHE_NAME, cache_of

from .utils import tiny_config, tiny_model, variant_id

PAD = 0
PAD_LENGTHS = (0, 2, 4)
PROMPT_LENGTH = 8
NEW_TOKENS = 12
CACHED_VARIANTS = [
    ("polyglu", {}),
    ("polyglu", {"routing_pooling": "token"}),
    ("moa", {}),
    ("dualglu", {}),
    ("dynamic_geglu", {}),
    ("la", {}),
    ("swiglu", {}),
]


def generation_model(ffn_type: str = "polyglu", **options):
    # a wider init than the preset's 0.02 keeps greedy continuations from collapsing onto one token
    return tiny_model(ffn_type=ffn_type, initializer_range=0.2, **options)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny_config().vocab_size, (batch, length), generator=generator)


def left_padded_prompts(seed: int = 0):
    input_ids = random_ids(len(PAD_LENGTHS), PROMPT_LENGTH, seed)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(PAD_LENGTHS):
        input_ids[row, :pad] = PAD
        attention_mask[row, :pad] = 0
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() derives from a 2-D mask."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def generate(model, input_ids, attention_mask, **kwargs):
    settings = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    settings.update(kwargs)
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, **settings)


def step_by_step_logit_difference(model, continuation_length: int = 5) -> float:
    """Prefill the prompts, feed a fixed continuation one token at a time through the returned cache, and compare
    with one full forward, over the non-pad positions."""
    prompt_ids, prompt_mask = left_padded_prompts(seed=1)
    full_ids = torch.cat([prompt_ids, random_ids(len(PAD_LENGTHS), continuation_length, seed=2)], dim=1)
    full_mask = torch.cat([prompt_mask, torch.ones(len(PAD_LENGTHS), continuation_length, dtype=torch.long)], dim=1)
    positions = positions_from_mask(full_mask)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
        output = model(
            prompt_ids, attention_mask=prompt_mask, position_ids=positions[:, :PROMPT_LENGTH], use_cache=True
        )
        pieces = [output.logits]
        for t in range(PROMPT_LENGTH, full_ids.shape[1]):
            output = model(
                full_ids[:, t : t + 1],
                attention_mask=full_mask[:, : t + 1],
                position_ids=positions[:, t : t + 1],
                cache=cache_of(output),
                use_cache=True,
            )
            pieces.append(output.logits)
    stepped = torch.cat(pieces, dim=1)
    real = full_mask.bool()
    return (stepped[real] - full[real]).abs().max().item()


@pytest.mark.parametrize("variant", CACHED_VARIANTS, ids=variant_id)
def test_greedy_generation_with_cache_equals_recomputation(variant):
    ffn_type, options = variant
    model = generation_model(ffn_type, **options)
    input_ids, attention_mask = left_padded_prompts()
    cached = generate(model, input_ids, attention_mask, use_cache=True)
    recomputed = generate(model, input_ids, attention_mask, use_cache=False)
    new_tokens = cached[:, PROMPT_LENGTH:]
    assert new_tokens.shape == (len(PAD_LENGTHS), NEW_TOKENS)
    assert new_tokens.unique().numel() > 3, "degenerate continuation, the comparison would be weak"
    matching = (new_tokens == recomputed[:, PROMPT_LENGTH:]).sum().item()
    print(f"\n[generation] {variant_id(variant)}: cache vs no cache, {matching}/{new_tokens.numel()} tokens equal")
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("variant", CACHED_VARIANTS, ids=variant_id)
def test_step_by_step_decoding_matches_full_forward(variant):
    ffn_type, options = variant
    difference = step_by_step_logit_difference(generation_model(ffn_type, **options))
    print(f"\n[generation] {variant_id(variant)}: step-by-step vs full forward max|Δlogit| = {difference:.3e}")
    assert difference <= 1e-4


def test_step_by_step_check_detects_a_lost_routing_state(monkeypatch):
    model = generation_model("polyglu")
    monkeypatch.setattr(PolyGLUCache, "get_routing_state", lambda self, layer_idx: (None, None))
    assert step_by_step_logit_difference(model) > 1e-3


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_beam_search_with_cache_equals_recomputation(cache_implementation):
    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=3)
    settings = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, min_new_tokens=8)
    settings.update(return_dict_in_generate=True, output_scores=True)
    cached = generate(model, input_ids, attention_mask, use_cache=True, cache_implementation=cache_implementation,
                      **settings)
    recomputed = generate(model, input_ids, attention_mask, use_cache=False, **settings)
    assert cached.sequences.shape == (2 * len(PAD_LENGTHS), PROMPT_LENGTH + 8)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, rtol=0, atol=1e-4)
    # the two returned beams of a prompt are different continuations
    first_beams, second_beams = cached.sequences[0::2], cached.sequences[1::2]
    assert not torch.equal(first_beams, second_beams)


def test_sampling_is_reproducible_with_a_fixed_seed():
    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=4)

    def sample(seed, **kwargs):
        torch.manual_seed(seed)
        return generate(model, input_ids, attention_mask, do_sample=True, top_k=0, **kwargs)

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert torch.equal(first, sample(0, use_cache=False))
    assert not torch.equal(first, sample(1))


def test_explicit_dynamic_cache_is_adopted():
    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=5)
    cache = DynamicCache(config=model.config)
    with_cache = generate(model, input_ids, attention_mask, **{CACHE_NAME: cache})  # generate()'s name in this version
    assert isinstance(cache, PolyGLUCache)
    assert cache.get_seq_length() == PROMPT_LENGTH + NEW_TOKENS - 1
    assert set(cache.routing_sums) == {0, 1}
    assert torch.equal(with_cache, generate(model, input_ids, attention_mask))


def test_non_empty_foreign_dynamic_cache_is_rejected():
    input_ids, attention_mask = left_padded_prompts(seed=6)
    foreign = DynamicCache(config=tiny_config(ffn_type="swiglu"))
    other_model = tiny_model(ffn_type="swiglu", seed=1)
    with torch.no_grad():
        other_model(input_ids, attention_mask=attention_mask, cache=foreign, use_cache=True)
    assert type(foreign) is DynamicCache and foreign.get_seq_length() == PROMPT_LENGTH
    model = generation_model("polyglu")
    next_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    with pytest.raises(ValueError, match="PolyGLUCache"):
        with torch.no_grad():
            model(input_ids[:, -1:], attention_mask=next_mask, cache=foreign, use_cache=True)


@pytest.mark.parametrize("variant", [("polyglu", {}), ("polyglu", {"routing_hard": True}), ("moa", {})], ids=variant_id)
def test_static_cache_generation_equals_recomputation(variant):
    ffn_type, options = variant
    model = generation_model(ffn_type, **options)
    input_ids, attention_mask = left_padded_prompts(seed=7)
    static = generate(model, input_ids, attention_mask, cache_implementation="static")
    assert static[:, PROMPT_LENGTH:].unique().numel() > 3, "degenerate continuation, the comparison would be weak"
    assert torch.equal(static, generate(model, input_ids, attention_mask, use_cache=False))
    assert torch.equal(static, generate(model, input_ids, attention_mask))  # the dynamic cache


def test_static_cache_generation_depends_on_the_routing_state():
    """The control: the same weights routed per token generate otherwise, so the equalities above are not vacuous."""
    input_ids, attention_mask = left_padded_prompts(seed=7)
    causal = generate(generation_model("polyglu"), input_ids, attention_mask, cache_implementation="static")
    per_token = generate(generation_model("polyglu", routing_pooling="token"), input_ids, attention_mask,
                         cache_implementation="static")
    assert not torch.equal(causal, per_token)


def test_static_cache_generation_with_a_fullgraph_compiled_forward_equals_recomputation():
    """The fast path transformers documents for static caches: `model.forward = torch.compile(..., fullgraph=True)`."""
    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=7)
    recomputed = generate(model, input_ids, attention_mask, use_cache=False)
    model.forward = torch.compile(model.forward, fullgraph=True)
    try:
        compiled = generate(model, input_ids, attention_mask, cache_implementation="static")
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, recomputed)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_chunked_prefill_equals_recomputation(cache_implementation):
    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=7)
    chunk_lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: chunk_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        chunked = generate(model, input_ids, attention_mask, cache_implementation=cache_implementation,
                           prefill_chunk_size=3)
    finally:
        hook.remove()
    assert chunk_lengths[:3] == [3, 3, 2]  # the 8-token prompts went in three chunks, the running state across them
    assert torch.equal(chunked, generate(model, input_ids, attention_mask, use_cache=False))


def test_a_reset_static_cache_starts_the_next_generation_from_an_empty_routing_state():
    model = generation_model("polyglu")
    first_ids, first_mask = left_padded_prompts(seed=8)
    second_ids, second_mask = left_padded_prompts(seed=9)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT_LENGTH + NEW_TOKENS)
    generate(model, first_ids, first_mask, **{CACHE_NAME: cache})
    assert isinstance(cache, PolyGLUStaticCache) and cache.routing_sums
    cache.reset()
    assert not cache.routing_sums
    reused = generate(model, second_ids, second_mask, **{CACHE_NAME: cache})
    assert torch.equal(reused, generate(model, second_ids, second_mask, use_cache=False))


def test_static_cache_routing_state_is_updated_in_place():
    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=10)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT_LENGTH + 4)
    positions = positions_from_mask(attention_mask)
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True)
        assert isinstance(cache, PolyGLUStaticCache) and set(cache.routing_sums) == {0, 1}
        addresses = {layer: tensor.data_ptr() for layer, tensor in cache.routing_sums.items()}
        before = cache.routing_sums[0].clone()
        next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
        next_mask = torch.cat([attention_mask, torch.ones_like(next_ids)], dim=1)
        model(next_ids, attention_mask=next_mask, position_ids=positions[:, -1:] + 1, cache=cache, use_cache=True)
    assert {layer: tensor.data_ptr() for layer, tensor in cache.routing_sums.items()} == addresses
    assert not torch.equal(cache.routing_sums[0], before)


def test_caches_of_other_layouts_are_rejected_with_what_works():
    class CustomCache(DynamicCache):
        pass

    model = generation_model("polyglu")
    input_ids, attention_mask = left_padded_prompts(seed=11)
    with pytest.raises(ValueError, match="a CustomCache cannot carry it.*StaticCache"):
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask, cache=CustomCache(config=model.config), use_cache=True)


def labelled_cache(batch: int = 3) -> PolyGLUCache:
    """A filled PolyGLUCache whose row b holds the value b (plus 10 per layer) in keys, values and routing sums,
    and the count b + 1."""
    config = tiny_config()
    cache = PolyGLUCache(config=config)
    rows = torch.arange(batch, dtype=torch.float32)
    for layer in range(config.num_hidden_layers):
        keys = (rows + 10 * layer).view(batch, 1, 1, 1).expand(batch, config.num_key_value_heads, 4, config.head_dim)
        cache.update(keys.clone(), keys.clone() + 0.5, layer)
        sums = (rows + 10 * layer)[:, None].expand(batch, config.hidden_size).clone()
        cache.set_routing_state(layer, sums, (rows + 1)[:, None])
    return cache


def row_labels(cache: PolyGLUCache, layer: int):
    keys = cache.layers[layer].keys[:, 0, 0, 0] - 10 * layer
    values = cache.layers[layer].values[:, 0, 0, 0] - 10 * layer - 0.5
    sums, counts = cache.get_routing_state(layer)
    return keys, values, sums[:, 0] - 10 * layer, counts[:, 0] - 1


@pytest.mark.parametrize(
    ("operation", "expected_rows"),
    [
        (lambda cache: cache.reorder_cache(torch.tensor([2, 0, 1])), [2, 0, 1]),
        (lambda cache: cache.batch_select_indices(torch.tensor([0, 2])), [0, 2]),
        (lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
    ],
    ids=["reorder_cache", "batch_select_indices", "batch_repeat_interleave"],
)
def test_cache_reorders_routing_state_with_keys(operation, expected_rows):
    cache = labelled_cache()
    operation(cache)
    expected = torch.tensor(expected_rows, dtype=torch.float32)
    for layer in range(2):
        for labels in row_labels(cache, layer):
            assert torch.equal(labels, expected)
