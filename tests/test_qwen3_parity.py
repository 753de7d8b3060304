"""Parity of the swiglu backbone with transformers' own Qwen3ForCausalLM, the independent reference.

Both models are built locally from the same small dimensions; Qwen3 is randomly initialised (seeded) and its
weights are then spread far from init (norm gains included) so that a swapped or mis-mapped tensor shows.
"""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_polyglu import PolyGLUConfig, PolyGLUForCausalLM

DIMS = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
PAD_LENGTHS = (0, 3, 5)
PROMPT_LENGTH = 10
LOGIT_TOLERANCE = 1e-5


def spread_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace every parameter by a seeded draw: O(1/sqrt(fan_in)) matrices, gains around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1:
                parameter.copy_(1.0 + 0.3 * noise)
            else:
                parameter.copy_(noise / parameter.shape[-1] ** 0.5)
    return model


def qwen3_model(tie: bool, attn: str, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=tie, attn_implementation=attn, **DIMS))
    return spread_weights(model, seed).eval()


def swiglu_model(tie: bool, attn: str, seed: int = 0) -> PolyGLUForCausalLM:
    torch.manual_seed(seed)
    config = PolyGLUConfig(ffn_type="swiglu", tie_word_embeddings=tie, attn_implementation=attn, **DIMS)
    return PolyGLUForCausalLM(config).eval()


def qwen3_and_its_swiglu_copy(tie: bool, attn: str):
    """A Qwen3 model and a swiglu PolyGLU model (built with other random weights) loaded strictly from it."""
    qwen3 = qwen3_model(tie, attn)
    polyglu = swiglu_model(tie, attn, seed=1)
    polyglu.load_state_dict(qwen3.state_dict(), strict=True)
    return qwen3, polyglu


def left_padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, DIMS["vocab_size"], (len(PAD_LENGTHS), PROMPT_LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(PAD_LENGTHS):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = DIMS["pad_token_id"]
    return input_ids, attention_mask


def max_logit_difference(model_a, model_b, input_ids, attention_mask) -> float:
    with torch.no_grad():
        logits_a = model_a(input_ids, attention_mask=attention_mask).logits
        logits_b = model_b(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    # a comparison of near-constant logits would prove nothing
    assert logits_a[real].std() > 0.1
    return (logits_a[real] - logits_b[real]).abs().max().item()


def greedy(model, input_ids, attention_mask, new_tokens=10):
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=DIMS["pad_token_id"],
    )


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_qwen3_state_dict_loads_strictly_into_swiglu_model(tie):
    qwen3, polyglu = qwen3_and_its_swiglu_copy(tie, "eager")
    for name, tensor in qwen3.state_dict().items():
        torch.testing.assert_close(polyglu.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert (polyglu.lm_head.weight.data_ptr() == polyglu.model.embed_tokens.weight.data_ptr()) == tie


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match_qwen3_with_left_padding(tie, attn):
    qwen3, polyglu = qwen3_and_its_swiglu_copy(tie, attn)
    assert polyglu.config._attn_implementation == qwen3.config._attn_implementation == attn
    input_ids, attention_mask = left_padded_batch()
    difference = max_logit_difference(qwen3, polyglu, input_ids, attention_mask)
    print(f"\n[qwen3 parity] tie={tie} attn={attn}: max|Δlogit| over non-pad positions = {difference:.3e}")
    assert difference <= LOGIT_TOLERANCE


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_greedy_generation_matches_qwen3(tie, attn):
    qwen3, polyglu = qwen3_and_its_swiglu_copy(tie, attn)
    input_ids, attention_mask = left_padded_batch(seed=2)
    expected = greedy(qwen3, input_ids, attention_mask)
    generated = greedy(polyglu, input_ids, attention_mask)
    new_tokens = expected[:, PROMPT_LENGTH:]
    assert new_tokens.shape == (len(PAD_LENGTHS), 10)
    assert new_tokens.unique().numel() > 3, "degenerate continuation, the comparison would be weak"
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_swiglu_state_dict_loads_strictly_into_qwen3(tie):
    polyglu = spread_weights(swiglu_model(tie, "sdpa", seed=3), seed=3)
    qwen3 = qwen3_model(tie, "sdpa", seed=4)
    qwen3.load_state_dict(polyglu.state_dict(), strict=True)
    input_ids, attention_mask = left_padded_batch(seed=5)
    difference = max_logit_difference(polyglu, qwen3, input_ids, attention_mask)
    print(f"\n[qwen3 parity, reverse] tie={tie}: max|Δlogit| = {difference:.3e}")
    assert difference <= LOGIT_TOLERANCE
