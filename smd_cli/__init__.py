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
    "StableMultiDiffusionPipeline": "smd_cli.pipeline",
    "StableMultiDiffusionSDXLPipeline": "smd_cli.pipeline",
    "StreamMultiDiffusion": "smd_cli.stream",
    "StreamMultiDiffusionSDXL": "smd_cli.stream",
    "seed_everything": "smd_cli.pipeline",
    "load_scene": "smd_cli.scene",
    "generate": "smd_cli.render",
    "Result": "smd_cli.render",
    "SmdError": "smd_cli.errors",
    "SceneError": "smd_cli.errors",
    "ModelError": "smd_cli.errors",
}

if TYPE_CHECKING:
    from smd_cli.errors import ModelError, SceneError, SmdError
    from smd_cli.pipeline import StableMultiDiffusionPipeline, StableMultiDiffusionSDXLPipeline, seed_everything
    from smd_cli.render import Result, generate
    from smd_cli.scene import load_scene
    from smd_cli.stream import StreamMultiDiffusion, StreamMultiDiffusionSDXL


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smd_cli' has no attribute {name!r}")
