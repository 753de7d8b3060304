"""The model across the supported transformers range (setup.cfg: >= 5.17, < 6; CI runs the oldest and the newest).

- The KV cache under both of its names: `cache` (5.24+) and `past_key_values` (before), in forward, generate and
  the outputs, without deprecation warnings from our own calls.
- The tested range: its ends agree with setup.cfg and CI's pins, and remote code warns once outside it.
- Checkpoints cross versions: saved under one end of the range, loaded through trust_remote_code under the other
  (both ways), with equal logits and equal cached greedy tokens. The other end's interpreter comes from
  POLYGLU_OTHER_TRANSFORMERS_PYTHON (`.ci/run` builds that venv); without it these tests skip, unless
  POLYGLU_REQUIRE_CROSS_VERSION=1 (set by CI) makes the absence a failure.
"""

import configparser
import json
import logging as std_logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from modeling_polyglu import PolyGLUCache, configuration_polyglu
from modeling_polyglu.modeling_polyglu import CACHE_NAME, cache_of

from .utils import tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSS_VERSION_VARIANTS = {
    "polyglu-causal": {"ffn_type": "polyglu"},  # routing state in the cache
    "moa": {"ffn_type": "moa"},
    "swiglu": {"ffn_type": "swiglu"},
}


def prompt(seed: int = 0, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(seed))


def decode_two_steps(model, cache_keyword: str):
    """Prefill, then feed two tokens one at a time, passing the cache under `cache_keyword`."""
    input_ids = prompt()
    with torch.no_grad():
        output = model(input_ids[:, :5], use_cache=True)
        logits = [output.logits]
        for t in (5, 6):
            output = model(input_ids[:, t : t + 1], use_cache=True, **{cache_keyword: cache_of(output)})
            logits.append(output.logits)
    return torch.cat(logits, dim=1), cache_of(output)


# ----------------------------------------------------------------------------------------------------------------
# the cache under both names
# ----------------------------------------------------------------------------------------------------------------


def test_output_field_is_the_name_this_transformers_declares():
    declared = {field for field in BaseModelOutputWithPast.__dataclass_fields__}
    assert CACHE_NAME in declared and CACHE_NAME in {"cache", "past_key_values"}
    output = tiny_model(ffn_type="polyglu")(prompt(), use_cache=True)
    assert CACHE_NAME in output.keys()
    assert isinstance(cache_of(output), PolyGLUCache)


@pytest.mark.parametrize("ffn_type", ["polyglu", "swiglu"])
def test_forward_takes_the_cache_under_either_name(ffn_type):
    model = tiny_model(ffn_type=ffn_type)
    with_new_name, cache_a = decode_two_steps(model, "cache")
    with_old_name, cache_b = decode_two_steps(model, "past_key_values")
    torch.testing.assert_close(with_new_name, with_old_name, atol=0, rtol=0)
    assert cache_a.get_seq_length() == cache_b.get_seq_length() == 7
    with torch.no_grad():
        recomputed = model(prompt(), use_cache=False).logits
    torch.testing.assert_close(with_new_name, recomputed, atol=1e-5, rtol=0)


def test_two_different_caches_under_both_names_is_an_error():
    model = tiny_model(ffn_type="polyglu")
    with pytest.raises(ValueError, match="not both"):
        model(prompt(), cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_forward_and_generate_raise_no_deprecation_warnings():
    model = tiny_model(ffn_type="polyglu", initializer_range=0.2)
    transformers_logger = transformers.utils.logging.get_logger("transformers")
    records = []
    handler = std_logging.Handler()
    handler.emit = records.append
    transformers_logger.addHandler(handler)
    warning_once = getattr(std_logging.Logger, "warning_once", None)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # a message already logged once in this process would not show again
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                output = model(prompt(), use_cache=True)
                model(prompt()[:, :1], cache=cache_of(output), use_cache=True)
                model.generate(prompt(), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    finally:
        transformers_logger.removeHandler(handler)
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in records]
    deprecations = [m for m in messages if "deprecat" in m.lower() or "past_key_values" in m]
    assert deprecations == []


# ----------------------------------------------------------------------------------------------------------------
# the tested range
# ----------------------------------------------------------------------------------------------------------------


def pinned_version(constraints_file: Path, package: str) -> str:
    for line in constraints_file.read_text().splitlines():
        match = re.fullmatch(rf"{package}==(\S+)", line.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{constraints_file} pins no {package}")


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_tested_range_is_what_setup_cfg_admits_and_ci_pins():
    oldest, newest = configuration_polyglu.TESTED_TRANSFORMERS
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    requirement = next(r for r in setup["options"]["install_requires"].split() if r.startswith("transformers"))
    assert re.fullmatch(rf"transformers>={re.escape(oldest)},<6", requirement), requirement
    assert major_minor(pinned_version(REPO_ROOT / ".ci" / "constraints.txt", "transformers")) == newest
    assert major_minor(pinned_version(REPO_ROOT / ".ci" / "constraints-oldest.txt", "transformers")) == oldest


@pytest.fixture
def fresh_version_warning(monkeypatch):
    # the flag lives on the transformers module the config file imported (under 5.17 the name `transformers` here
    # can be bound to another module object, transformers' package replacing itself with a lazy module)
    monkeypatch.setattr(configuration_polyglu.transformers, "_polyglu_untested_version_warned", False, raising=False)


@pytest.mark.parametrize("version", ["5.17.0", "5.20.1", "5.24.0", "5.25.0", "5.25.3"])
def test_no_warning_inside_the_tested_range(version, fresh_version_warning):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configuration_polyglu.warn_if_untested_transformers(version) is False


@pytest.mark.parametrize("version", ["5.16.2", "5.26.0.dev0", "6.0.0"])
def test_one_warning_outside_the_tested_range(version, fresh_version_warning):
    with pytest.warns(UserWarning, match=r"tested with transformers 5\.17 to 5\.25\.x") as caught:
        assert configuration_polyglu.warn_if_untested_transformers(version) is True
    assert version in str(caught[0].message) and "pip install 'transformers>=5.17,<5.26'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configuration_polyglu.warn_if_untested_transformers(version) is True  # once per process


def test_remote_code_warns_when_imported_under_an_untested_version(tmp_path):
    tiny_model(ffn_type="moa").save_pretrained(tmp_path)
    script = (
        "import sys, warnings; sys.modules['modeling_polyglu'] = None\n"
        "import transformers; transformers.__version__ = '5.99.0'\n"
        "from transformers import AutoConfig\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    AutoConfig.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        f"    AutoConfig.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(sum('tested with transformers' in str(w.message) for w in caught))\n"
    )
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "1"


# ----------------------------------------------------------------------------------------------------------------
# checkpoints across the two ends of the range
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_python():
    path = os.environ.get("POLYGLU_OTHER_TRANSFORMERS_PYTHON")
    if path:
        return path
    if os.environ.get("POLYGLU_REQUIRE_CROSS_VERSION") == "1":
        pytest.fail("POLYGLU_REQUIRE_CROSS_VERSION=1 but POLYGLU_OTHER_TRANSFORMERS_PYTHON names no interpreter")
    pytest.skip("set POLYGLU_OTHER_TRANSFORMERS_PYTHON to a python with another transformers (see .ci/run)")


def run_child(python: str, mode: str, out_dir: Path) -> dict:
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_MODULES_CACHE": str(out_dir / f"modules-{mode}"),
        "HF_HUB_OFFLINE": "1",
    }
    completed = subprocess.run(
        [python, str(REPO_ROOT / "tests" / "cross_version_child.py"), mode, str(out_dir), json.dumps(CROSS_VERSION_VARIANTS)],
        capture_output=True, text=True, cwd=out_dir, env=environment, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("direction", ["saved-here-loaded-there", "saved-there-loaded-here"])
def test_checkpoint_crosses_transformers_versions(direction, other_python, tmp_path):
    saver, loader = (sys.executable, other_python) if direction == "saved-here-loaded-there" else (other_python, sys.executable)
    saved_with = run_child(saver, "save", tmp_path)["transformers"]
    loaded_with = run_child(loader, "load", tmp_path)["transformers"]
    assert saved_with != loaded_with, "the other interpreter runs the same transformers"
    for name in CROSS_VERSION_VARIANTS:
        saved = load_file(tmp_path / name / "evaluation-save.safetensors")
        loaded = load_file(tmp_path / name / "evaluation-load.safetensors")
        real = torch.ones_like(saved["logits"][..., 0], dtype=torch.bool)
        real[1, :2] = real[2, :3] = False  # the pads of the child's prompts
        difference = (loaded["logits"][real] - saved["logits"][real]).abs().max().item()
        print(f"[cross-version] {name}: saved {saved_with}, loaded {loaded_with}: max|Δlogit| {difference:.1e}")
        assert difference <= 1e-5, name
        continuation = saved["cached_tokens"][:, 8:]
        assert all(len(set(row.tolist())) >= 3 for row in continuation), f"{name}: degenerate greedy continuation"
        for key in ("cached_tokens", "recomputed_tokens"):
            assert torch.equal(loaded[key], saved["cached_tokens"]), f"{name}: {key}"
        assert torch.equal(saved["recomputed_tokens"], saved["cached_tokens"]), name
