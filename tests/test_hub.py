"""`push_to_hub` end to end: the real huggingface_hub client against the in-memory Hub in tests/hub_server.py.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import, into
`huggingface_hub.constants`, and transformers keeps a shared `HfApi` whose endpoint is fixed when it is first used.
So the `hub` fixture does both: it sets the environment (for the fresh interpreters that load the pushed model) and
patches those already-imported values in this process. Nothing leaves 127.0.0.1.
"""

import os

import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_polyglu.char_tokenizer import build_char_tokenizer
from modeling_polyglu.conversion.remote_code import load_in_fresh_process
from tests.hub_server import LoopbackHub
from tests.utils import tiny_model

INPUT_IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 2]])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running LoopbackHub with the client (this process and child processes) pointed at it."""
    with LoopbackHub() as server:
        home = tmp_path / "hf_home"
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
        env = {
            "HF_ENDPOINT": server.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "hf_loopback_dummy_token",
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(home),
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        # variables that would override HF_HOME or turn the client offline in the child processes
        overriding = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_MODULES_CACHE", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE")
        for name in overriding:
            monkeypatch.delenv(name, raising=False)

        # this process imported huggingface_hub before the variables above were set: patch what it computed
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        old_home = constants.HF_HOME
        for name, value in list(vars(constants).items()):  # HF_HOME, HF_HUB_CACHE, HF_TOKEN_PATH, HF_XET_CACHE, ...
            if name.isupper() and isinstance(value, str) and value.startswith(old_home):
                monkeypatch.setattr(constants, name, str(home) + value[len(old_home) :])
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # rebuilt on first use, with the new endpoint
        yield server


def local_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS, use_cache=False).logits


def test_push_model_and_tokenizer_then_load_with_remote_code(hub):
    repo_id = "user/tiny-polyglu"
    model = tiny_model(ffn_type="polyglu")
    tokenizer = build_char_tokenizer(["0123456789+="])
    model_commit = model.push_to_hub(repo_id)
    tokenizer_commit = tokenizer.push_to_hub(repo_id)

    files = set(hub.repos[repo_id].resolve("main").files)
    assert {"config.json", "model.safetensors", "modeling_polyglu.py", "configuration_polyglu.py"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert HfApi().model_info(repo_id).sha == tokenizer_commit.oid != model_commit.oid
    assert not any("lfs" in path or "xet" in path for _, path in hub.requests)

    remote, info = load_in_fresh_process(repo_id, INPUT_IDS, env=dict(os.environ))
    assert info["causal_lm"] == "PolyGLUForCausalLM" and info["base"] == "PolyGLUModel"
    assert not info["module"].startswith("modeling_polyglu")  # the class came from the Hub's copy of the code
    assert torch.equal(remote, local_logits(model))

    reloaded = AutoTokenizer.from_pretrained(repo_id)
    text = "12+34=46"
    ids = reloaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"]
    assert reloaded.decode(ids, skip_special_tokens=True) == text


def test_revision_pinning(hub):
    repo_id = "user/tiny-polyglu-revisions"
    first_model, second_model = tiny_model(seed=0, ffn_type="polyglu"), tiny_model(seed=1, ffn_type="polyglu")
    first = first_model.push_to_hub(repo_id)
    second = second_model.push_to_hub(repo_id)
    assert first.oid != second.oid
    assert HfApi().model_info(repo_id).sha == second.oid
    first_logits, second_logits = local_logits(first_model), local_logits(second_model)
    assert not torch.equal(first_logits, second_logits)

    # the pinned commit through remote code in a fresh interpreter (code and weights both fetched at that sha) ...
    pinned, _ = load_in_fresh_process(repo_id, INPUT_IDS, revision=first.oid, env=dict(os.environ))
    assert torch.equal(pinned, first_logits)
    # ... and both revisions in this process with the registered classes (a second fresh interpreter costs ~10 s)
    for revision, expected in [(first.oid, first_logits), ("main", second_logits), (None, second_logits)]:
        loaded = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=False).eval()
        assert torch.equal(local_logits(loaded), expected), revision


def test_missing_entries_are_protocol_errors_and_tree_lists_files(hub):
    repo_id = HfApi().create_repo("user/empty").repo_id
    with pytest.raises(EntryNotFoundError) as caught:
        hf_hub_download(repo_id, "does-not-exist.json")
    # LocalEntryNotFoundError is an EntryNotFoundError too (raised when the server is unreachable): insist on the
    # server's own answer
    assert isinstance(caught.value, RemoteEntryNotFoundError)
    assert caught.value.response.status_code == 404
    assert caught.value.response.headers["X-Error-Code"] == "EntryNotFound"

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="0" * 40)
    assert hf_hub_download(repo_id, ".gitattributes").endswith(".gitattributes")

    # the tree listing that list_repo_files / list_repo_tree read
    api = HfApi()
    api.upload_file(path_or_fileobj=b"nested\n", path_in_repo="sub/dir/notes.txt", repo_id=repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "sub/dir/notes.txt"]
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(repo_id)}
    assert top == {".gitattributes": "RepoFile", "sub": "RepoFolder"}
    assert [entry.path for entry in api.list_repo_tree(repo_id, path_in_repo="sub/dir")] == ["sub/dir/notes.txt"]
