"""`polyglu pretrain`: packing, the packed loss against separate documents, a tiny run and its checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from modeling_polyglu.cli import main as cli_main
from modeling_polyglu.conversion.remote_code import load_in_fresh_process
from modeling_polyglu.training.pretrain import (
    PretrainArguments,
    _pretrain_trainer_class,
    build_config,
    build_parser,
    complete_checkpoints,
    new_model,
    normalise_config_flag,
    parse_arguments,
    resolve_max_steps,
    run_pretrain,
)
from modeling_polyglu.training.pretrain_data import (
    ListDocuments,
    _local_data_files,
    build_ascii_tokenizer,
    held_out_rows,
    pack_documents,
    positions_from_starts,
    stdlib_source_files,
)


def write_corpus(path: Path, documents: int = 120) -> Path:
    """A small JSONL corpus of code-like documents of varying length."""
    lines = []
    for index in range(documents):
        body = "".join(f"    y{k} = x * {index % 7} + {k}\n" for k in range(1 + index % 5))
        lines.append(json.dumps({"text": f"def f{index}(x):\n{body}    return y0\n"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pack_documents_restarts_positions_and_masks_segment_starts():
    rows = list(pack_documents([[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]], max_length=4))
    # stream 10 11 12 20 | 21 30 31 32 | (33 34 dropped: partial row)
    assert [row["input_ids"] for row in rows] == [[10, 11, 12, 20], [21, 30, 31, 32]]
    assert [row["position_ids"] for row in rows] == [[0, 1, 2, 0], [0, 0, 1, 2]]  # 21 continues a document: new segment
    assert [row["labels"] for row in rows] == [[-100, 11, 12, -100], [-100, -100, 31, 32]]
    truncated = list(pack_documents([[1, 2, 3, 4, 5, 6], [7, 8, 9]], max_length=3, truncate=True))
    assert [row["input_ids"] for row in truncated] == [[1, 2, 3], [7, 8, 9]]
    assert positions_from_starts([False, False, True, False]) == [0, 1, 0, 1]


def test_held_out_rows_count_the_documents_they_use():
    tokenizer = build_ascii_tokenizer()
    documents = ListDocuments(["abcdefgh", "ij", "klmnopqrstuv", "never read"])
    rows, used = held_out_rows(documents, tokenizer, max_length=6, num_rows=2)
    # [bos]abcde | fgh-truncated... : doc 1 fills row 1 (6 of its 10 tokens), docs 2-3 fill row 2
    assert len(rows) == 2 and used == 3
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 3, 0, 1]


def test_local_files_and_embedded_corpus(tmp_path):
    (tmp_path / "train.txt").write_text("one\n\ntwo\n")
    (tmp_path / "validation.txt").write_text("three\n")
    builder, splits = _local_data_files(tmp_path)
    assert builder == "text" and set(splits) == {"train", "validation"}
    (tmp_path / "extra.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="both JSON and .txt"):
        _local_data_files(tmp_path)
    files = stdlib_source_files()
    assert len(files) > 100 and all(path.suffix == ".py" and "test" not in path.parts for path in files)


def test_arguments_budget_and_config_flag():
    assert normalise_config_flag(["--config", "tiny-debug", "--config", "r.yaml", "--config=x.json"]) == [
        "--model_config", "tiny-debug", "--config", "r.yaml", "--model_config=x.json"]
    parser = build_parser()
    arguments, training_args, _ = parse_arguments(parser, ["--output_dir", "x", "--max_tokens", "10000",
                                                           "--per_device_train_batch_size", "4"])
    assert resolve_max_steps(arguments, training_args, max_length=128) == 20  # ceil(10000 / 512)
    arguments, training_args, _ = parse_arguments(parser, ["--output_dir", "x"])
    with pytest.raises(ValueError, match="--max_steps N or --max_tokens N"):
        resolve_max_steps(arguments, training_args, max_length=128)
    # the vocabulary follows the tokenizer, not the preset
    config = build_config(PretrainArguments(ffn_type="moa", config_overrides='{"routing_tau": 0.5}'), build_ascii_tokenizer())
    assert (config.vocab_size, config.ffn_type, config.routing_tau) == (len(build_ascii_tokenizer()), "moa", 0.5)


@pytest.mark.parametrize("ffn_type", ["swiglu", "polyglu"])
def test_packed_eval_loss_equals_separate_documents(ffn_type, tmp_path):
    """In eval mode (where the model would build a KV cache) the trainer's loss on packed rows sees no other document."""
    from transformers import TrainingArguments

    tokenizer = build_ascii_tokenizer()
    model = new_model(build_config(PretrainArguments(ffn_type=ffn_type), tokenizer), seed=0).eval()
    documents = [[1] + tokenizer(text, add_special_tokens=False).input_ids + [2] for text in ("def f(x):", "return 1", "pass")]
    rows = list(pack_documents(documents, max_length=sum(map(len, documents))))
    packed = {key: torch.tensor([value]) for key, value in rows[0].items()}
    trainer = _pretrain_trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    with torch.no_grad():
        packed_loss = trainer.compute_loss(model, packed).item()
        total, count = 0.0, 0
        for ids in documents:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    assert packed_loss == pytest.approx(total / count, abs=1e-5)


def test_tiny_pretrain_run_is_a_normal_checkpoint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    output = tmp_path / "run"
    parser = build_parser()
    arguments, training_args, routing_args = parse_arguments(parser, [
        "--config", "tiny-debug", "--ffn_type", "polyglu", "--dataset", str(corpus), "--output_dir", str(output),
        "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--max_length", "32", "--eval_rows", "8",
        "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--routing_monitor_steps", "3",
        "--disable_tqdm", "true",
    ])
    summary = run_pretrain(arguments, training_args, routing_args, quiet=True)
    assert [step for step, _ in summary["eval_loss_history"]] == [0, 3, 6]
    assert summary["final_eval_loss"] == summary["eval_loss_history"][-1][1] < summary["eval_loss_history"][0][1]
    assert summary["final_step"] == 6 and summary["tokens_per_step"] == 128 and summary["tokens_per_second"] > 0
    assert json.loads((output / "run_summary.json").read_text())["final_eval_loss"] == summary["final_eval_loss"]
    assert [path.name for path in complete_checkpoints(output)] == ["checkpoint-6"]  # save_total_limit=1
    card = (output / "README.md").read_text()
    assert "library_name: transformers" in card and "base_model" not in card
    assert (output / "routing_report.json").is_file()

    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(output).eval()
    assert local.config.vocab_size == len(build_ascii_tokenizer())
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        expected = local(input_ids, use_cache=False).logits
    logits, info = load_in_fresh_process(output, input_ids)
    assert info["module"].startswith("transformers_modules")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_bad_input_is_one_line(capsys):
    assert cli_main(["pretrain", "--output_dir", "x", "--max_steps", "1", "--config_overrides", "[1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert cli_main(["pretrain", "--output_dir", "x", "--max_steps", "1", "--config", "no-such-preset"]) == 2
    assert "Unknown preset" in capsys.readouterr().err


def test_a_config_path_that_is_not_there_is_named_as_a_path(tmp_path, capsys):
    for source, problem in ((tmp_path / "model.json", "no such file"), (tmp_path, "no config.json in it")):
        assert cli_main(["pretrain", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--config", str(source)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"polyglu pretrain: error: --model_config {source}: {problem}; pass a preset name, a JSON config file or a "
            "checkpoint directory."
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    ('{"routing_taux": 0.5}', "'routing_taux' is not a PolyGLUConfig field; did you mean 'routing_tau'?"),
    ('{"intermediate_size": 64, "zzz": 1}', "'zzz' is not a PolyGLUConfig field; PolyGLUConfig's docstring"),
])
def test_a_misspelt_config_field_is_refused_before_training(overrides, message, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = ["pretrain", "--output_dir", str(output_dir), "--max_steps", "1", "--config_overrides", overrides]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"polyglu pretrain: error: config_overrides: {message}")
    assert "\n" not in error and not output_dir.exists()


def test_config_overrides_take_every_saved_field_and_the_old_rope_names():
    config = build_config(
        PretrainArguments(config_overrides='{"rope_theta": 10000.0, "routing_hard": true, "use_cache": false}'),
        build_ascii_tokenizer(),
    )
    assert (config.rope_parameters["rope_theta"], config.routing_hard, config.use_cache) == (10000.0, True, False)
