"""The remote-code files import only the standard library, torch, transformers and each other.

`save_pretrained` copies REMOTE_CODE_FILES next to every checkpoint and transformers follows only their relative
imports of flat siblings (`from .x import ...`). An import of anything else — a tool module of this package, or a
library a user without `polyglu` may lack — would break loading with trust_remote_code, so the imports are read
from the source (every `import`, also inside functions) rather than trusted. The one exception is an optional
library imported inside a `try` block — triton for the GPU kernel, vLLM for the attention layers that hold causal
routing's state when vLLM builds the model: transformers' import check skips those, and the code that needs them runs
only where they are installed.
"""

import ast
import sys
from pathlib import Path

import pytest

from modeling_polyglu import modeling_polyglu as model_module
from modeling_polyglu.modeling_polyglu import REMOTE_CODE_FILES

ALLOWED_LIBRARIES = {"torch", "transformers"}
OPTIONAL_LIBRARIES = {"triton", "vllm"}  # only inside `try` blocks
PACKAGE_ROOT = Path(model_module.__file__).resolve().parent
SIBLING_MODULES = {Path(name).stem for name in REMOTE_CODE_FILES}


def _forbidden_imports(source: str) -> list[str]:
    """Every import in `source` that is not stdlib, torch, transformers, `from .<sibling> import` or an optional
    library inside a `try` block."""
    forbidden = []
    tree = ast.parse(source)
    guarded = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try)
               for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            # transformers copies `from .x import` of a flat sibling; `from . import x` and `from ..x` are not followed
            if node.level != 1 or node.module not in SIBLING_MODULES:
                forbidden.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
            continue
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            optional = top in OPTIONAL_LIBRARIES and id(node) in guarded
            if top not in sys.stdlib_module_names and top not in ALLOWED_LIBRARIES and not optional:
                forbidden.append(f"line {node.lineno}: {name}")
    return forbidden


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_file_imports_only_stdlib_torch_transformers_and_siblings(name):
    path = PACKAGE_ROOT / name
    assert Path(name).name == name and path.is_file(), f"{name} must be a flat file next to modeling_polyglu.py"
    assert _forbidden_imports(path.read_text()) == [], f"{name} imports something a Hub repo does not carry"


def test_the_check_catches_tool_imports():
    source = (
        "import os\nimport torch\nfrom transformers import PreTrainedConfig\nfrom .activation_mixing import ACTIVATIONS\n"
        "from .conversion.qwen3 import convert_qwen3\nfrom . import presets\nimport safetensors\n"
        "def later():\n    from modeling_polyglu.training import sft\n"
        "try:\n    import triton\nexcept ImportError:\n    pass\nimport triton.language\n"
    )
    assert _forbidden_imports(source) == [
        "line 5: from .conversion.qwen3 import ...",
        "line 6: from . import ...",
        "line 7: safetensors",
        "line 14: triton.language",  # outside the try block
        "line 9: modeling_polyglu.training",  # ast.walk visits the top level first
    ]
