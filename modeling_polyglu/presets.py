"""Named model presets: one JSON file per preset in the repository's configuration/ folder.

`load_preset("tiny-debug", ffn_type="moa")` returns a PolyGLUConfig; `list_presets()` names what is available.
An editable install reads configuration/ in the checkout; a wheel install reads the copy installed under
`<prefix>/share/polyglu/configuration`.
"""

import json
import os
import sys
from pathlib import Path

from .configuration_polyglu import PolyGLUConfig


def preset_directories() -> list[Path]:
    """Where presets are looked up, in order: $POLYGLU_PRESETS_DIR, the checkout, the installed data files."""
    candidates = []
    if os.environ.get("POLYGLU_PRESETS_DIR"):
        candidates.append(Path(os.environ["POLYGLU_PRESETS_DIR"]))
    candidates.append(Path(__file__).resolve().parent.parent / "configuration")
    candidates.append(Path(sys.prefix) / "share" / "polyglu" / "configuration")
    return [directory for directory in candidates if directory.is_dir()]


def list_presets() -> list[str]:
    names = {path.stem for directory in preset_directories() for path in directory.glob("*.json")}
    return sorted(names)


def preset_path(name: str) -> Path:
    for directory in preset_directories():
        path = directory / f"{name}.json"
        if path.is_file():
            return path
    raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(list_presets()) or 'none found'}.")


def load_preset(name: str, **overrides) -> PolyGLUConfig:
    """The preset's PolyGLUConfig, with keyword overrides applied (e.g. ffn_type="moa")."""
    values = json.loads(preset_path(name).read_text())
    values.pop("model_type", None)
    values.update(overrides)
    return PolyGLUConfig(**values)
