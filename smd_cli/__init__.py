"""smd: region-based multi-prompt image generation with StreamMultiDiffusion.

Heavy modules (torch, diffusers) load only when a pipeline is used, so that importing
`smd_cli` and running `smd --help` or `smd validate` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.3.0"  # also the package version (pyproject.toml reads it)

__all__ = [
    "StableMultiDiffusionPipeline",
    "StableMultiDiffusionSDXLPipeline",
    "StreamMultiDiffusion",
    "StreamMultiDiffusionSDXL",
    "seed_everything",
    "load_scene",
    "generate",
    "Result",
    "SmdError",
    "SceneError",
    "ModelError",
    "__version__",
]

_LAZY = {
    "StableMultiDiffusionPipeline": "smd_cli.engine.pipeline",
    "StableMultiDiffusionSDXLPipeline": "smd_cli.engine.pipeline",
    "StreamMultiDiffusion": "smd_cli.engine.stream",
    "StreamMultiDiffusionSDXL": "smd_cli.engine.stream",
    "seed_everything": "smd_cli.engine.pipeline",
    "load_scene": "smd_cli.scenes.scene",
    "generate": "smd_cli.app.requests",
    "Result": "smd_cli.app.requests",
    "SmdError": "smd_cli.core.errors",
    "SceneError": "smd_cli.core.errors",
    "ModelError": "smd_cli.core.errors",
}

if TYPE_CHECKING:
    from smd_cli.app.requests import Result, generate
    from smd_cli.core.errors import ModelError, SceneError, SmdError
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline, StableMultiDiffusionSDXLPipeline, seed_everything
    from smd_cli.engine.stream import StreamMultiDiffusion, StreamMultiDiffusionSDXL
    from smd_cli.scenes.scene import load_scene


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smd_cli' has no attribute {name!r}")
