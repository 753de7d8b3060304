"""LoRA fine-tuning with PEFT, in the spirit of transformers' PeftIntegrationTester, for the routed FFN variants.

`modeling_polyglu.training.peft.lora_config_for(model)` puts LoRA on every attention and FFN projection and trains each
layer's `mlp.router` in full (`modules_to_save=["router"]`). These tests follow one adapter through its life:

- get_peft_model: LoRA on every projection present, routers trainable, base weights frozen
  [test_get_peft_model_targets_every_projection_and_trains_routers]
- a few AdamW steps move both the LoRA matrices and the routers, nothing else
  [test_training_updates_lora_and_router_weights]
- save_pretrained: the adapter file carries the trained router tensors, adapter_config.json says CAUSAL_LM
  [test_saved_adapter_contains_router_tensors]
- reload onto the saved base model with PeftModel.from_pretrained, and with AutoPeftModelForCausalLM through remote code
  [test_peft_model_from_pretrained_reproduces_trained_logits,
  test_auto_peft_model_with_remote_code_reproduces_trained_logits]
- merge_and_unload: a plain model with the trained routers, saved with its code and loadable without the package
  [test_merge_and_unload_gives_plain_model_with_trained_logits]
- draw_lora_weights_by_name: A depends on the seed and the name only, PEFT's distribution, B left zero
  [test_lora_start_depends_on_seed_and_name_only]

The trained model is built once per ffn_type (module-scoped fixture); tests that change it work on copies.
"""

import copy
import json
import time

import pytest
import torch
from safetensors.torch import load_file

import modeling_polyglu  # noqa: F401  (registers the Auto classes)
from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.training.peft import draw_lora_weights_by_name, lora_config_for
from modeling_polyglu.conversion.remote_code import load_in_fresh_process

from ..utils import tiny_config, tiny_model

peft = pytest.importorskip("peft")
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402

ROUTED_FFN_TYPES = ["polyglu", "moa", "dualglu", "la", "dynamic_geglu"]
FFN_TYPES_UNDER_TEST = ROUTED_FFN_TYPES + ["swiglu", "mlp_relu"]  # swiglu: no router; mlp_relu: no router, no gate_proj
FRESH_PROCESS_FFN_TYPES = ("polyglu",)  # a fresh interpreter costs ~6 s: once is enough
# spelled out here rather than imported from modeling_polyglu.training.peft, so that a projection dropped there
# fails these tests
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
REMOTE_FILES = {
    "configuration_polyglu.py", "modeling_polyglu.py", "activation_mixing.py", "cpu_mixing_kernel.py",
}
VOCAB_SIZE = tiny_config().vocab_size
FIRST_ORDINARY_TOKEN = 3  # 0, 1 and 2 are pad, bos and eos in the tiny preset
TRAINING_STEPS = 6
LEARNING_RATE = 1e-2
RELOAD_TOLERANCE = 1e-5  # same weights, same graph: only summation order may differ
MERGE_TOLERANCE = 1e-4  # W + B A folded into one matrix rounds differently from W x + B (A x)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def random_ids(batch, length, seed) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, VOCAB_SIZE, (batch, length), generator=generator)


EVAL_IDS = random_ids(2, 10, seed=1)
TRAIN_IDS = random_ids(4, 12, seed=2)


def has_gate(ffn_type) -> bool:
    return not ffn_type.startswith("mlp_")


def has_router(ffn_type) -> bool:
    return ffn_type in ROUTED_FFN_TYPES


def expected_targets(ffn_type) -> set:
    ffn = FFN_PROJECTIONS if has_gate(ffn_type) else tuple(p for p in FFN_PROJECTIONS if p != "gate_proj")
    return set(ATTENTION_PROJECTIONS) | set(ffn)


def build(ffn_type) -> PolyGLUForCausalLM:
    # routing_noise="none": polyglu's Gumbel noise would make training (and its effect) non-deterministic.
    # dynamic_geglu keeps its initial gate: randomized scale/bias saturate sigmoid(s·‖LayerNorm(x)‖ + b)
    # (‖·‖ ≈ √d) at 0 or 1, where training the gate barely changes the function.
    return tiny_model(0, randomize=ffn_type != "dynamic_geglu", ffn_type=ffn_type, routing_noise="none")


def eval_logits(model, input_ids=EVAL_IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def decoder_layers(peft_model):
    return peft_model.get_base_model().model.layers


def trained_router_state(peft_model) -> dict:
    """{"model.layers.i.mlp.router.<param>": tensor} of the trained copies (the ones modules_to_save holds)."""
    state = {}
    for index, layer in enumerate(decoder_layers(peft_model)):
        wrapper = layer.mlp.router
        assert isinstance(wrapper, ModulesToSaveWrapper), f"layer {index} router is not wrapped: {type(wrapper)}"
        for name, tensor in wrapper.modules_to_save["default"].state_dict().items():
            state[f"model.layers.{index}.mlp.router.{name}"] = tensor.detach().clone()
    return state


def router_state_of_plain_model(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if ".router." in name}


def lora_parameters(peft_model) -> dict:
    return {name: p.detach().clone() for name, p in peft_model.named_parameters() if ".lora_" in name}


# ----------------------------------------------------------------------------------------------------------------
# the trained adapter, built once per ffn_type
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FFN_TYPES_UNDER_TEST)
def trained(request, tmp_path_factory):
    """Base model saved to base_dir, LoRA-trained on top of it, adapter saved to adapter_dir."""
    ffn_type = request.param
    root = tmp_path_factory.mktemp(f"peft-{ffn_type}")
    base_dir, adapter_dir = root / "base", root / "adapter"

    base = build(ffn_type)
    base.save_pretrained(base_dir)
    base_logits = eval_logits(base)

    # built from a model loaded from base_dir, so adapter_config.json's base_model_name_or_path points there
    peft_model = get_peft_model(PolyGLUForCausalLM.from_pretrained(base_dir), lora_config_for(base))
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    lora_before = lora_parameters(peft_model)
    routers_before = trained_router_state(peft_model) if has_router(ffn_type) else {}

    # default LoRA init (B = 0): the first step moves B only, later steps move A too
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                  weight_decay=0.0)  # no decay: every change below comes from a gradient
    peft_model.train()
    torch.manual_seed(0)  # LoRA dropout
    losses = []
    for _ in range(TRAINING_STEPS):
        loss = peft_model(input_ids=TRAIN_IDS, labels=TRAIN_IDS, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    trained_logits = eval_logits(peft_model)
    peft_model.save_pretrained(adapter_dir)
    return {
        "ffn_type": ffn_type,
        "base_dir": base_dir,
        "adapter_dir": adapter_dir,
        "root": root,
        "peft_model": peft_model,
        "base_logits": base_logits,
        "trained_logits": trained_logits,
        "frozen_before": frozen_before,
        "lora_before": lora_before,
        "routers_before": routers_before,
        "routers_after": trained_router_state(peft_model) if has_router(ffn_type) else {},
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------


def test_target_and_saved_module_names_are_taken_as_trl_hands_them_over():
    """TRL's ModelConfig turns a single --lora_target_modules value into a str, which PEFT reads as a regex over full
    names (and we read letter by letter, dropping every letter): a lone name targeted nothing."""
    model = build("polyglu")
    assert lora_config_for(model, target_modules="q_proj").target_modules == {"q_proj"}
    assert set(lora_config_for(model, target_modules="all-linear").target_modules) == expected_targets("polyglu")
    regex = r".*\.(q|v)_proj"
    assert lora_config_for(model, target_modules=regex).target_modules == regex
    peft_model = get_peft_model(build("polyglu"), lora_config_for(build("polyglu"), target_modules=regex))
    adapted = sorted({name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)})
    assert adapted == ["q_proj", "v_proj"]
    for argument, flag in (({"target_modules": "nope"}, "--lora_target_modules nope"),
                           ({"target_modules": "q_proj["}, r"--lora_target_modules q_proj\["),  # not a regex either
                           ({"target_modules": ["q_proj", "nope"]}, "--lora_target_modules nope"),
                           ({"modules_to_save": ["lm_head", "nope"]}, "--lora_modules_to_save nope")):
        with pytest.raises(ValueError, match=rf"^{flag}: no module of this model is named so; its module names end in "
                                             r".*\bq_proj\b.*\brouter\b"):
            lora_config_for(model, **argument)
    assert list(lora_config_for(model, modules_to_save=["lm_head"]).modules_to_save) == ["lm_head", "router"]


@pytest.mark.parametrize("ffn_type", FFN_TYPES_UNDER_TEST)
def test_get_peft_model_targets_every_projection_and_trains_routers(ffn_type):
    model = build(ffn_type)
    config = lora_config_for(model)
    assert str(config.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    assert set(config.target_modules) == expected_targets(ffn_type)
    if has_router(ffn_type):
        assert list(config.modules_to_save) == ["router"]
    else:
        assert not config.modules_to_save, f"{ffn_type} has no router, got modules_to_save={config.modules_to_save}"

    peft_model = get_peft_model(model, config)
    for index, layer in enumerate(decoder_layers(peft_model)):
        projections = {**{n: getattr(layer.self_attn, n) for n in ATTENTION_PROJECTIONS},
                       **{n: getattr(layer.mlp, n) for n in FFN_PROJECTIONS if hasattr(layer.mlp, n)}}
        assert set(projections) == expected_targets(ffn_type)
        for name, module in projections.items():
            assert isinstance(module, LoraLayer), f"layer {index} {name} has no LoRA: {type(module).__name__}"
            assert "default" in module.lora_A and "default" in module.lora_B
            assert module.lora_A["default"].weight.requires_grad and module.lora_B["default"].weight.requires_grad
            assert not module.get_base_layer().weight.requires_grad, f"layer {index} {name} base weight trainable"
        if has_router(ffn_type):
            wrapper = layer.mlp.router
            assert isinstance(wrapper, ModulesToSaveWrapper)
            trainable = list(wrapper.modules_to_save["default"].parameters())
            assert trainable, f"layer {index}: the router has no parameters"
            assert all(p.requires_grad for p in trainable), f"layer {index}: router parameters frozen"
            assert not any(p.requires_grad for p in wrapper.original_module.parameters())
        else:
            assert not hasattr(layer.mlp, "router")

    for name, parameter in peft_model.named_parameters():
        is_adapter = ".lora_" in name or ".modules_to_save.default." in name
        assert parameter.requires_grad == is_adapter, f"{name}: requires_grad={parameter.requires_grad}"
    router_parameters = [n for n, p in peft_model.named_parameters() if ".router." in n and p.requires_grad]
    assert bool(router_parameters) == has_router(ffn_type)


def test_training_updates_lora_and_router_weights(trained):
    peft_model, ffn_type = trained["peft_model"], trained["ffn_type"]
    losses = trained["losses"]
    print(f"\n[peft {ffn_type}] loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0]

    lora_after = lora_parameters(peft_model)
    assert set(lora_after) == set(trained["lora_before"]) and lora_after
    unchanged_lora = [n for n, p in lora_after.items() if torch.equal(p, trained["lora_before"][n])]
    assert not unchanged_lora, f"LoRA weights not updated by training: {unchanged_lora}"

    if has_router(ffn_type):
        before, after = trained["routers_before"], trained["routers_after"]
        assert set(before) == set(after) and after
        unchanged = [n for n in after if torch.equal(after[n], before[n])]
        assert not unchanged, f"router weights not updated by training: {unchanged}"
        # the frozen originals stay as loaded
        for index, layer in enumerate(decoder_layers(peft_model)):
            for name, tensor in layer.mlp.router.original_module.state_dict().items():
                assert torch.equal(tensor, before[f"model.layers.{index}.mlp.router.{name}"])

    changed_frozen = [n for n, p in peft_model.named_parameters()
                      if n in trained["frozen_before"] and not torch.equal(p, trained["frozen_before"][n])]
    assert not changed_frozen, f"frozen weights changed: {changed_frozen}"

    delta = max_diff(trained["trained_logits"], trained["base_logits"])
    print(f"[peft {ffn_type}] trained vs base: max|Δlogit| = {delta:.3e}")
    assert delta > 1e-3, "the trained adapter does not change the model's function"

    if has_router(ffn_type):
        # the trained routers matter on their own: putting the initial ones back changes the logits
        untrained_routers = copy.deepcopy(peft_model)
        for index, layer in enumerate(decoder_layers(untrained_routers)):
            layer.mlp.router.modules_to_save["default"].load_state_dict(layer.mlp.router.original_module.state_dict())
        router_delta = max_diff(eval_logits(untrained_routers), trained["trained_logits"])
        print(f"[peft {ffn_type}] trained vs initial routers (same LoRA): max|Δlogit| = {router_delta:.3e}")
        assert router_delta > 1e-4, "training the routers does not change the model's function"


def test_saved_adapter_contains_router_tensors(trained):
    adapter_dir, ffn_type = trained["adapter_dir"], trained["ffn_type"]
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["base_model_name_or_path"] == str(trained["base_dir"])

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    router_keys = {key for key in saved if "router" in key}
    if not has_router(ffn_type):
        assert not router_keys
        assert not adapter_config.get("modules_to_save")
    else:
        assert adapter_config["modules_to_save"] == ["router"]
        # PEFT drops ".modules_to_save.default" in the file: base_model.model.<name in the plain model>
        expected = {f"base_model.model.{name}" for name in trained["routers_after"]}
        assert router_keys == expected, f"missing {expected - router_keys}, unexpected {router_keys - expected}"
        for name, tensor in trained["routers_after"].items():
            assert torch.equal(saved[f"base_model.model.{name}"], tensor), f"{name}: saved value is not the trained one"

    lora_keys = {key for key in saved if ".lora_" in key}
    assert len(lora_keys) == 2 * len(expected_targets(ffn_type)) * tiny_config().num_hidden_layers
    others = set(saved) - router_keys - lora_keys
    assert not others, f"base weights leaked into the adapter: {sorted(others)[:5]}"


def test_peft_model_from_pretrained_reproduces_trained_logits(trained):
    base = PolyGLUForCausalLM.from_pretrained(trained["base_dir"])
    reloaded = PeftModel.from_pretrained(base, trained["adapter_dir"])
    delta = max_diff(eval_logits(reloaded), trained["trained_logits"])
    print(f"\n[peft {trained['ffn_type']}] PeftModel.from_pretrained vs trained: max|Δlogit| = {delta:.3e}")
    assert delta <= RELOAD_TOLERANCE
    if has_router(trained["ffn_type"]):
        for name, tensor in trained_router_state(reloaded).items():
            assert torch.equal(tensor, trained["routers_after"][name]), f"{name} not restored from the adapter"


def test_auto_peft_model_with_remote_code_reproduces_trained_logits(trained):
    reloaded = AutoPeftModelForCausalLM.from_pretrained(trained["adapter_dir"], trust_remote_code=True)
    assert isinstance(reloaded, PeftModel)
    base_class = type(reloaded.get_base_model())
    assert base_class.__name__ == "PolyGLUForCausalLM"
    delta = max_diff(eval_logits(reloaded), trained["trained_logits"])
    print(f"\n[peft {trained['ffn_type']}] AutoPeftModelForCausalLM ({base_class.__module__}) vs trained: "
          f"max|Δlogit| = {delta:.3e}")
    assert delta <= RELOAD_TOLERANCE


def test_merge_and_unload_gives_plain_model_with_trained_logits(trained):
    ffn_type = trained["ffn_type"]
    merged = copy.deepcopy(trained["peft_model"]).merge_and_unload()
    assert type(merged) is PolyGLUForCausalLM
    leftovers = [n for n, m in merged.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]
    assert not leftovers, f"adapter modules left after merge_and_unload: {leftovers}"
    assert not any("lora_" in n or "modules_to_save" in n or "original_module" in n for n in merged.state_dict())

    merged_logits = eval_logits(merged)
    delta = max_diff(merged_logits, trained["trained_logits"])
    print(f"\n[peft {ffn_type}] merged vs trained PeftModel: max|Δlogit| = {delta:.3e}")
    assert delta <= MERGE_TOLERANCE

    routers = router_state_of_plain_model(merged)
    assert set(routers) == set(trained["routers_after"])
    for name, tensor in trained["routers_after"].items():
        assert torch.equal(routers[name], tensor), f"{name}: merged router is not the trained one"

    merged_dir = trained["root"] / "merged"
    merged.save_pretrained(merged_dir)
    saved_files = {path.name for path in merged_dir.iterdir()}
    assert REMOTE_FILES <= saved_files and "model.safetensors" in saved_files
    assert "adapter_config.json" not in saved_files
    saved = load_file(str(merged_dir / "model.safetensors"))
    assert not any("lora_" in key or "modules_to_save" in key for key in saved)

    reloaded_delta = max_diff(eval_logits(PolyGLUForCausalLM.from_pretrained(merged_dir)), merged_logits)
    print(f"[peft {ffn_type}] merged checkpoint reloaded vs merged: max|Δlogit| = {reloaded_delta:.3e}")
    assert reloaded_delta <= RELOAD_TOLERANCE

    if ffn_type in FRESH_PROCESS_FFN_TYPES:
        start = time.perf_counter()
        remote_logits, info = load_in_fresh_process(merged_dir, EVAL_IDS)
        remote_delta = max_diff(remote_logits.float(), merged_logits)
        print(f"[peft {ffn_type}] merged checkpoint in a fresh process vs merged: max|Δlogit| = {remote_delta:.3e}"
              f" ({time.perf_counter() - start:.1f} s)")
        assert info["module"].startswith("transformers_modules.")
        assert remote_delta <= RELOAD_TOLERANCE
        assert max_diff(remote_logits.float(), trained["trained_logits"]) <= MERGE_TOLERANCE


def test_lora_start_depends_on_seed_and_name_only():
    def start(seed, model_seed):
        peft_model = get_peft_model(tiny_model(model_seed, ffn_type="polyglu"), lora_config_for(tiny_model(0), r=4))
        draw_lora_weights_by_name(peft_model, seed)
        return lora_parameters(peft_model)

    first, again, other_base, other_seed = start(7, 0), start(7, 0), start(7, 1), start(8, 0)
    a_names = [name for name in first if ".lora_A." in name]
    assert a_names and len(a_names) == len(first) // 2
    for name, tensor in first.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(other_base[name], tensor, rtol=0, atol=0)  # the base weights do not matter
        if ".lora_B." in name:
            assert not tensor.any(), name
            continue
        assert max_diff(other_seed[name], tensor) > 1e-3, name
        fan_in = tensor.shape[1]
        bound = fan_in ** -0.5  # kaiming_uniform with a=√5: sqrt(6 / ((1 + 5) fan_in))
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.8 * bound, name
    different = {first[a].flatten()[:8].tolist().__repr__() for a in a_names}
    assert len(different) == len(a_names), "two layers started from the same A"
