"""Pretrained diffusers pipelines as starting points: one module per kind of pipeline (Stable Diffusion 1.x/2.x,
SDXL, PixArt, SD3, Flux), registered here by the pipeline classes it reads. `open_pipeline` reads a local pipeline
directory (model_index.json) and names what is wrong with it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from gen_dist.pipelines.base import MODEL_INDEX, Cond, Kind, Pipeline, PromptEncoders, Settings, unwrapped
from gen_dist.schema import ConfigError

__all__ = ["MODEL_INDEX", "Cond", "Kind", "Pipeline", "PromptEncoders", "Settings", "is_pipeline", "kinds",
           "open_pipeline", "unwrapped"]

MODULES = ("sd", "sdxl", "pixart", "sd3", "flux")


def kinds() -> dict[str, Kind]:
    """Every supported pipeline class name, with the kind that reads it."""
    found: dict[str, Kind] = {}
    for name in MODULES:
        kind = importlib.import_module(f"gen_dist.pipelines.{name}").KIND
        found.update(dict.fromkeys(kind.classes, kind))
    return found


def is_pipeline(path: str | Path) -> bool:
    return (Path(path).expanduser() / MODEL_INDEX).is_file()


def open_pipeline(path: str | Path, what: str = "diffusion.pretrained") -> Pipeline:
    """The pipeline directory at `path`; ConfigError naming the problem (not a pipeline, a class gen_dist does
    not read, a missing component)."""
    root = Path(path).expanduser()
    if not (root / MODEL_INDEX).is_file():
        hint = " (a hub id? download it first: `huggingface-cli download ID --local-dir DIR`)" if not root.exists() \
            else ""
        raise ConfigError(f"{what}: {path} is not a diffusers pipeline directory (no {MODEL_INDEX}){hint}")
    index = json.loads((root / MODEL_INDEX).read_text())
    found = kinds()
    cls = index.get("_class_name", "?")
    if cls not in found:
        raise ConfigError(f"{what}: {path} holds a {cls}, which gen_dist does not fine-tune; supported: "
                          f"{', '.join(found)}")
    kind = found[cls]
    missing = [c for c in kind.components if not (isinstance(index.get(c), list) and index[c][0] and
                                                    (root / c).is_dir())]
    if missing:
        raise ConfigError(f"{what}: {path} ({cls}) lacks its {', '.join(missing)}: a {cls} needs "
                          f"{', '.join(kind.components)}")
    return Pipeline(root, index, kind)
