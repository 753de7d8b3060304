"""`polyglu convert polychromatic`: reference checkpoints import with the reference's noise-free logits.

The oracle is tests/reference_polychromatic.py, an independent implementation of REFERENCE.md's math; the
checkpoints are small random reference-format files with routing far from its initialisation.
"""

import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.char_tokenizer import build_char_tokenizer
from modeling_polyglu.cli import main
from modeling_polyglu.conversion.polychromatic import convert_polychromatic

from ..reference_polychromatic import make_reference_state_dict, reference_logits, write_reference_checkpoint

QUIET = dict(log=lambda *args: None)


def _ids(vocab=64, batch=2, length=11, seed=3):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _imported_logits(directory, input_ids):
    model = PolyGLUForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("kind", ["portable", "sft", "safetensors"])
@pytest.mark.parametrize("tau", [0.1, 0.7])
def test_import_reproduces_reference_noise_free_logits(tmp_path, kind, tau):
    state_dict = make_reference_state_dict(seed=1, nontrivial_routing=True, nontrivial_norms=True)
    source = tmp_path / ("ckpt.safetensors" if kind == "safetensors" else "ckpt.pt")
    write_reference_checkpoint(source, state_dict, kind, tau)
    config = convert_polychromatic(source, tmp_path / "out", **QUIET)
    assert config.routing_tau == pytest.approx(tau) and config.routing_pooling == "sequence"
    input_ids = _ids()
    expected = reference_logits(state_dict, input_ids, tau)
    actual = _imported_logits(tmp_path / "out", input_ids)
    difference = (actual - expected).abs().max().item()
    print(f"{kind} τ={tau}: max|Δlogit| vs reference = {difference:.2e} (logit scale {expected.abs().max():.2f})")
    assert difference <= 1e-4


def test_imported_dims_are_inferred_from_shapes(tmp_path):
    state_dict = make_reference_state_dict(vocab_size=40, hidden=48, d_ff=40, layers=3, heads=6, kv_heads=3, seq_len=80)
    write_reference_checkpoint(tmp_path / "c.pt", state_dict, "sft", 0.1)
    config = convert_polychromatic(tmp_path / "c.pt", tmp_path / "out", **QUIET)
    dims = (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.max_position_embeddings)
    assert dims == (40, 48, 40, 3, 6, 3, 8, 80)
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings and config.use_cache is False


def test_bf16_source_uses_recomputed_fp32_rope_tables(tmp_path):
    state_dict = make_reference_state_dict(seed=2, dtype=torch.bfloat16)
    write_reference_checkpoint(tmp_path / "c.pt", state_dict, "portable", 0.1000460806)
    convert_polychromatic(tmp_path / "c.pt", tmp_path / "out", **QUIET)
    upcast = {name: tensor.float() for name, tensor in state_dict.items()}
    input_ids = _ids()
    actual = _imported_logits(tmp_path / "out", input_ids)
    exact_tables = reference_logits(upcast, input_ids, 0.1000460806, rope_from_state_dict=False)
    stored_tables = reference_logits(upcast, input_ids, 0.1000460806, rope_from_state_dict=True)
    print(f"bf16 source: vs exact tables {(actual - exact_tables).abs().max():.2e}, "
          f"vs stored bf16 tables {(actual - stored_tables).abs().max():.2e}")
    assert (actual - exact_tables).abs().max() <= 1e-4
    assert PolyGLUForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].mlp.router.alpha.dtype == torch.float32


def test_deepspeed_objects_in_the_optimizer_load_as_inert_stand_ins(tmp_path, monkeypatch):
    module = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")

    class LossScaler:
        def __init__(self, scale):
            self.cur_scale = scale

    LossScaler.__module__, LossScaler.__qualname__ = module.__name__, "LossScaler"
    module.LossScaler = LossScaler
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    state_dict = make_reference_state_dict(seed=4)
    torch.save({"model": state_dict, "optimizer": {"loss_scaler": LossScaler(2.0**16)}, "step": 7, "tau": 0.3},
               tmp_path / "portable_step7.pt")
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # the importer must not need deepspeed installed
    convert_polychromatic(tmp_path / "portable_step7.pt", tmp_path / "out", **QUIET)
    input_ids = _ids()
    assert (_imported_logits(tmp_path / "out", input_ids) - reference_logits(state_dict, input_ids, 0.3)).abs().max() <= 1e-4


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def _cli_error(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    return error


def _write_bad_source(tmp_path, breakage):
    state_dict = make_reference_state_dict(seed=5)
    if breakage == "garbage":
        path = tmp_path / "c.pt"
        path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    elif breakage == "code":
        path = tmp_path / "c.pt"
        torch.save({"model": state_dict, "tau": 0.1, "extra": _Payload()}, path)
    elif breakage == "qwen3_keys":
        path = tmp_path / "c.safetensors"
        save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(path), metadata={"tau": "0.1"})
    elif breakage == "wrong_shape":
        path = tmp_path / "c.pt"
        state_dict["model_core.1.gqa.W_v.weight"] = torch.zeros(5, 32)
        torch.save({"model": state_dict, "tau": 0.1}, path)
    elif breakage == "missing_tensor":
        path = tmp_path / "c.pt"
        del state_dict["model_core.0.polyglu.W_up.weight"]
        torch.save({"model": state_dict, "tau": 0.1}, path)
    elif breakage == "no_model":
        path = tmp_path / "c.pt"
        torch.save({"state_dict": state_dict, "tau": 0.1}, path)
    elif breakage == "no_tau":
        path = tmp_path / "c.safetensors"
        write_reference_checkpoint(path, state_dict, "safetensors", 0.1)
        tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path)))
        save_file(tensors, str(path))
    else:
        path = tmp_path / "missing.pt"
    return path, state_dict


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("garbage", "not a readable PyTorch checkpoint"),
        ("code", "refuses to load safely"),
        ("qwen3_keys", "not a PolychromaticLM checkpoint"),
        ("wrong_shape", "has shape"),
        ("missing_tensor", "missing"),
        ("no_model", "has no 'model' state dict"),
        ("no_tau", "pass --tau"),
        ("nonexistent", "no such file"),
    ],
)
def test_bad_sources_fail_in_one_line_and_leave_nothing(tmp_path, capsys, breakage, message):
    source, _ = _write_bad_source(tmp_path, breakage)
    before = sorted(path.name for path in tmp_path.iterdir())
    error = _cli_error(capsys, ["convert", "polychromatic", "--src", str(source), "--dst", str(tmp_path / "out")])
    assert message in error
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_safetensors_without_tau_imports_with_explicit_tau_and_tokenizer(tmp_path, capsys):
    source, state_dict = _write_bad_source(tmp_path, "no_tau")
    tokenizer_dir = tmp_path / "tokenizer"
    build_char_tokenizer(["abc"]).save_pretrained(tokenizer_dir)
    assert main(["convert", "polychromatic", "--src", str(source), "--dst", str(tmp_path / "out"), "--tau", "0.25",
                 "--tokenizer", str(tokenizer_dir)]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "NOT causal" in card and 'routing_pooling="causal"' in card
    input_ids = _ids()
    assert (_imported_logits(tmp_path / "out", input_ids) - reference_logits(state_dict, input_ids, 0.25)).abs().max() <= 1e-4


def test_imported_model_generates_by_recomputation_and_causal_mode_is_a_different_function(tmp_path):
    state_dict = make_reference_state_dict(seed=7)
    write_reference_checkpoint(tmp_path / "c.pt", state_dict, "sft", 0.1)
    convert_polychromatic(tmp_path / "c.pt", tmp_path / "seq", **QUIET)
    convert_polychromatic(tmp_path / "c.pt", tmp_path / "causal", routing_pooling="causal", **QUIET)
    model = PolyGLUForCausalLM.from_pretrained(tmp_path / "seq").eval()
    assert model.generation_config.use_cache is False
    prompt = _ids(batch=1, length=5)
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    reference_next = reference_logits(state_dict, generated[:, :-1], 0.1)[:, -1].argmax(-1)
    assert torch.equal(generated[:, -1], reference_next)
    input_ids = _ids()
    causal_diff = (_imported_logits(tmp_path / "causal", input_ids) - _imported_logits(tmp_path / "seq", input_ids)).abs().max()
    assert causal_diff > 1e-3
