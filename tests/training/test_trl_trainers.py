"""TRL's DPOTrainer and GRPOTrainer on a PolyGLU model, as a user runs them (no polyglu command in between).

The policy is a converted tiny PolyGLU model (unbiased routers, so routing can move) passed as an instance; TRL builds
the reference model itself from the policy's path, which works once `modeling_polyglu` is imported (the Auto classes
are registered) or with `trust_remote_code=True` in DPOConfig.model_init_kwargs. The preference: the right sum over the
sum plus one. fp32 on the CPU (bf16=False: TRL defaults to bf16 autocast), 6 steps of 8 pairs.

- with routing noise off, the policy equals the reference at step 0, so the first loss is ln 2 (1e-6); the loss then
  falls and the chosen answers' reward margin grows [test_dpo_starts_at_ln2_and_learns_the_preference]
- the routers train (α and the router MLP move), stay fp32, and the saved model reloads with remote code to the
  trained logits [test_dpo_trains_the_routers_and_saves_a_loadable_model]
- with PolyGLU's Gumbel noise on (the training default) the policy's log-probabilities are noisy against the
  reference's (TRL evaluates the reference without noise), so the step-0 loss is not ln 2: the README's advice to
  turn the noise off for DPO, as TRL turns dropout off [test_routing_noise_makes_the_step0_policy_differ_from_the_reference]
- GRPO (2 steps, 4 completions of up to 6 tokens per prompt, sampled by generate() with the routing cache inside the
  training loop; the reward is the share of digits, which the samples differ in): finite losses, rewards that vary
  within a group, the routers train
  [test_grpo_generates_and_trains_the_routers]
"""

import math

import pytest
import torch

import modeling_polyglu  # noqa: F401  (registers the Auto classes: TRL loads the reference model by path)

from ..utils import write_converted_chat_models

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STEPS = 6


def preference_rows(count: int) -> list[dict]:
    rows = []
    for index in range(count):
        a, b = index % 10, (3 * index) % 10
        rows.append({
            "prompt": [{"role": "user", "content": f"what is {a}+{b}?"}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": str(a + b + 1)}],
        })
    return rows


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    write_converted_chat_models(root, ("polyglu",))
    return root / "polyglu"


def train_dpo(path, output_dir, routing_noise: str, steps: int = STEPS):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy.config.routing_noise = routing_noise
    arguments = DPOConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=policy, args=arguments, train_dataset=datasets.Dataset.from_list(preference_rows(48)),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    trainer.train()
    return trainer


def step_values(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


@pytest.fixture(scope="module")
def noiseless(converted, tmp_path_factory):
    return train_dpo(converted, tmp_path_factory.mktemp("dpo_run"), routing_noise="none")


def test_dpo_starts_at_ln2_and_learns_the_preference(noiseless):
    losses, margins = step_values(noiseless, "loss"), step_values(noiseless, "rewards/margins")
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < math.log(2) - 0.05, losses
    assert margins[-1] > margins[0] + 0.1, margins


def test_dpo_trains_the_routers_and_saves_a_loadable_model(noiseless, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = noiseless.model
    start = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    for name, parameter in trained.named_parameters():
        if ".router." in name:
            assert parameter.dtype == torch.float32, name
            assert (parameter.detach() - start.get_parameter(name)).abs().max() > 1e-4, f"{name} did not train"
    noiseless.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.float32)
    ids = torch.tensor([[3, 9, 12, 15, 4, 7, 20, 5]])
    trained.eval()
    with torch.no_grad():
        expected, got = trained(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - start(ids).logits).abs().max() > 1e-3, "training did not change the model"


def test_routing_noise_makes_the_step0_policy_differ_from_the_reference(converted, tmp_path):
    noisy = train_dpo(converted, tmp_path / "noisy", routing_noise="gumbel", steps=1)
    assert abs(step_values(noisy, "loss")[0] - math.log(2)) > 1e-6


def test_grpo_generates_and_trains_the_routers(converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    policy.config.routing_noise = "none"
    start = {name: parameter.detach().clone() for name, parameter in policy.named_parameters() if ".router." in name}
    rows = [{"prompt": row["prompt"], "answer": row["chosen"][0]["content"]} for row in preference_rows(16)]

    def digits(completions, **_):
        # a reward the random model's samples differ in (the right sum alone would be 0 for all of them, and GRPO's
        # group-normalised advantages with it)
        return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in (c[0]["content"] for c in completions)]

    arguments = GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=6, learning_rate=3e-3, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=policy, args=arguments, train_dataset=datasets.Dataset.from_list(rows), reward_funcs=digits,
        processing_class=AutoTokenizer.from_pretrained(converted),
    )
    trainer.train()
    losses = step_values(trainer, "loss")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert len(step_values(trainer, "reward")) == 2 and max(step_values(trainer, "reward_std")) > 0
    for name, parameter in trainer.model.named_parameters():
        if name in start:
            assert parameter.dtype == torch.float32, name
            assert (parameter.detach() - start[name]).abs().max() > 1e-5, f"{name} did not train"
