"""Scenes rendered: a scene file becomes a `Request`, a request an image with its record.

This is the one path from scenes to the engine. `generate` makes one image of a scene (what
`smd generate`, `smd inpaint`, `smd panorama` and `smd reproduce` do for each image);
`scene_stream` and `apply_scene` turn the same requests into a stream and its live updates
(`smd stream` and `--watch`).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smd_cli.app.records import Record, make_record
from smd_cli.core import defaults
from smd_cli.core.defaults import prefixed
from smd_cli.core.errors import SmdError
from smd_cli.engine.prepare import Layers, Request
from smd_cli.method.masks import check_divisible, fit_picture
from smd_cli.models.controls import ControlSpec
from smd_cli.models.loading import dtype_name
from smd_cli.models.loras import Lora, LoraSet
from smd_cli.models.references import ReferenceSpec
from smd_cli.scenes.canvas import FileChangedWarning, SceneMasks, checked_canvas, scene_masks
from smd_cli.scenes.scene import SceneFile, random_seed, scene_controlnets, scene_loras, scene_references, step_count

if TYPE_CHECKING:
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline
    from smd_cli.engine.stream import StreamMultiDiffusion
    from smd_cli.method.sampler import StepCallback


@dataclass
class Result:
    """One generated image and what made it."""

    image: Any
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)
    record: Record | None = None  # how it was made, written into the PNG by `save`

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the image atomically, with its record (PNG text chunks; XMP and EXIF in a JPEG or
        WebP, or a sidecar `NAME.smd.yaml` where that is too small). An existing file is kept (the
        image gets `name-1.png`, ...) unless `overwrite`. Returns the path written."""
        from smd_cli.app.records import save_options, write_sidecar
        from smd_cli.core.outputs import save_image

        path = Path(path)
        options, sidecar = save_options(self.record, path) if self.record is not None else ({}, None)
        written = save_image(self.image, path, overwrite=overwrite, **options)
        if sidecar is not None:
            write_sidecar(self.record, written, overwrite=True)
        return written


def scene_request(sf: SceneFile, masks: SceneMasks) -> Request:
    """What the engine needs of a scene whose masks were read at canvas size."""
    s = sf.scene
    prefix = s.negative_prefix
    layers = Layers([layer.prompt for layer in s.layers],
                    [prefixed(prefix, layer.negative_prompt) for layer in s.layers], masks.masks,
                    [layer.mask_strength for layer in s.layers], [layer.mask_std for layer in s.layers],
                    [layer.prompt_strength for layer in s.layers],
                    loras=[scene_lora_set(sf, layer.loras) for layer in s.layers],
                    controlnets=[control_specs(sf, masks, layer.controlnet, ("layers", i, "controlnet"))
                                 for i, layer in enumerate(s.layers)],
                    references=[reference_spec(sf, masks, layer.reference, ("layers", i, "reference"))
                                for i, layer in enumerate(s.layers)])
    picture = None if masks.picture is None else fit_picture(masks.picture, masks.width, masks.height)
    return Request(layers, masks.width, masks.height, s.background.prompt,
                   prefixed(prefix, s.background.negative_prompt), picture, steps=s.steps, timesteps=s.timesteps,
                   scheduler=s.scheduler, timestep_spacing=s.timestep_spacing, guidance_scale=s.guidance_scale,
                   true_cfg_scale=s.true_cfg_scale,
                   mask_type=s.mask_type, cover_alpha=s.cover_alpha, bootstrap_steps=s.bootstrap.steps,
                   bootstrap_mix_steps=s.bootstrap.mix_steps, leak_sensitivity=s.bootstrap.leak_sensitivity,
                   bootstrap_centre=s.bootstrap.centre, tile_size=s.tile_size, tile_stride=s.tile_stride,
                   tile_weighting=s.tile_weighting, circular=s.circular, region_crop=s.region_crop,
                   region_mode=s.region_mode, vae_tiles=s.vae_tiles,
                   loras=scene_lora_set(sf, s.loras),
                   controlnets=control_specs(sf, masks, s.controlnet, ("controlnet",)), negative_auto=s.negative_auto,
                   reference=reference_spec(sf, masks, s.reference, ("reference",)), hires=scene_hires(sf))


def scene_hires(sf: SceneFile):
    """The scene's hires pass as the engine takes it (`smd_cli.engine.hires.Hires`), or None."""
    from smd_cli.engine.hires import Hires

    h = sf.scene.hires
    if h is None:
        return None
    return Hires(h.scale, h.strength, h.steps, sf.source(h.controlnet) if h.controlnet else None, h.controlnet_scale)


def reference_spec(sf: SceneFile, masks: SceneMasks, spec, key: tuple) -> ReferenceSpec | None:
    """A scene key's reference image, read with the masks; its IP-Adapter relative to the scene."""
    if spec is None:
        return None
    return ReferenceSpec(masks.controls[key], spec.scale, sf.source(spec.adapter) if spec.adapter else None)


def control_specs(sf: SceneFile, masks: SceneMasks, specs, key: tuple) -> list[ControlSpec]:
    """A scene key's ControlNets with the images read with the masks; models relative to the scene."""
    return [ControlSpec(sf.source(spec.model), masks.controls[key + (i,)], spec.scale, spec.start, spec.end)
            for i, spec in enumerate(specs)]


def scene_lora_set(sf: SceneFile, specs) -> LoraSet:
    """The LoRAs of a scene key, paths relative to the scene file."""
    return tuple(Lora(sf.source(spec.path), spec.scale) for spec in specs)


def load_scene_models(pipe: StableMultiDiffusionPipeline, sf: SceneFile) -> None:
    """Load every LoRA, ControlNet, IP-Adapter and embedding the scene names; one that cannot load
    is an error at its key and line, and a file that changed since its sha256 was recorded is a
    warning."""
    for key, spec in scene_loras(sf):
        _warn_if_changed(sf, key, spec.path, spec.sha256)
        with _located(sf, key):
            pipe.load_loras([Lora(sf.source(spec.path), spec.scale)])
    for key, spec in scene_controlnets(sf):
        with _located(sf, key + ("model",)):
            pipe.load_controlnet(sf.source(spec.model))
    hires = sf.scene.hires
    if hires is not None and hires.controlnet is not None:
        with _located(sf, ("hires", "controlnet")):
            if not pipe.family.controls:
                raise SmdError(f"{pipe.family.label} runs no ControlNets here; remove hires.controlnet (the "
                               "hires pass runs without one)")
            pipe.load_controlnet(sf.source(hires.controlnet))
    for key, spec in scene_references(sf):
        with _located(sf, key + (("adapter",) if spec.adapter else ())):
            pipe.load_ip_adapter(sf.source(spec.adapter) if spec.adapter else None)
    for i, spec in enumerate(sf.scene.embeddings):
        _warn_if_changed(sf, ("embeddings", i), spec.path, spec.sha256)
        with _located(sf, ("embeddings", i)):
            pipe.load_embedding(sf.resolve(spec.path), spec.token)


@contextmanager
def _located(sf: SceneFile, key: tuple):
    """An `SmdError` raised inside, as an error at the scene's `key` and its line."""
    try:
        yield
    except SmdError as exc:
        raise sf.error(key, str(exc)) from None


def _warn_if_changed(sf: SceneFile, key: tuple, relative: str, recorded: str | None) -> None:
    """Warn when a weights file differs from the sha256 a record gave it."""
    from smd_cli.core.files import MAX_MODEL_BYTES, is_file, sha256

    path = sf.resolve(relative)
    if recorded and is_file(path) and sha256(path, MAX_MODEL_BYTES) != recorded:
        warnings.warn(str(sf.error(key, f"{path} has changed since its sha256 was recorded; the result will "
                                        "differ from the image it was recorded for")), FileChangedWarning,
                      stacklevel=3)


def needs_picture(sf: SceneFile) -> None:
    """Inpainting paints over a picture: the scene must name one."""
    if sf.scene.background.image is None:
        raise sf.error(("background",), "inpainting needs a picture: set background.image in the scene "
                                        "or pass --image PATH")


def one_layer(sf: SceneFile) -> None:
    """A panorama is one prompt over a wide canvas: the scene must have one layer."""
    if len(sf.scene.layers) != 1:
        raise sf.error(("layers",), f"a panorama scene has one layer, this one has {len(sf.scene.layers)}; "
                                    "use `smd generate` for several")


def generate(pipe: StableMultiDiffusionPipeline, sf: SceneFile, *, masks: SceneMasks | None = None,
             max_batch: int | None = None, callback: StepCallback | None = None,
             allow_large: bool = False) -> Result:
    """One image of a validated scene, with its seed (random if unset) and its record.

    `masks` reuses masks read earlier (`scene_masks`), so that the record hashes the bytes used.
    `allow_large` lets work past `defaults.LARGE_WORK` run (`pipe.run`).
    """
    return _make(pipe, sf, None, masks=masks, max_batch=max_batch, callback=callback, allow_large=allow_large)


def upscale(pipe: StableMultiDiffusionPipeline, sf: SceneFile, image: Any, *, masks: SceneMasks | None = None,
            max_batch: int | None = None, callback: StepCallback | None = None,
            allow_large: bool = False) -> Result:
    """The hires pass of scene `sf` (which has `hires`) over an existing `image` at the scene's
    canvas size (`smd upscale`), with its record: the scene as a two-pass generation."""
    return _make(pipe, sf, image, masks=masks, max_batch=max_batch, callback=callback, allow_large=allow_large)


def _make(pipe: StableMultiDiffusionPipeline, sf: SceneFile, image: Any, *, masks: SceneMasks | None,
          max_batch: int | None, callback: StepCallback | None, allow_large: bool) -> Result:
    """The image of scene `sf` (from scratch, or its hires pass over `image`) with its record."""
    import torch

    started = time.perf_counter()
    width, height = checked_canvas(sf, pipe.vae_scale_factor)
    if masks is None or (masks.width, masks.height) != (width, height):
        masks = scene_masks(sf, width, height)
    seed = sf.scene.seed if sf.scene.seed is not None else random_seed()
    load_scene_models(pipe, sf)
    request = scene_request(sf, masks)
    prepared = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(seed)
    if image is None:
        made = pipe.run(request, generator=generator, max_batch=max_batch, callback=callback, allow_large=allow_large)
    else:
        made = pipe.upscale(fit_picture(image, width, height), request, generator=generator, max_batch=max_batch,
                            callback=callback, allow_large=allow_large)
    timings = {"prepare": prepared - started, "generate": time.perf_counter() - prepared}
    record = image_record(pipe, sf, seed=seed, width=width, height=height, timings=timings, files=masks.files)
    return Result(image=made, seed=seed, timings=timings, record=record)


def image_record(pipe: StableMultiDiffusionPipeline, sf: SceneFile, *, seed: int, width: int, height: int,
                 timings: dict[str, float], files: dict[Path, str]) -> Record:
    """The record of an image of scene `sf` made by `pipe`."""
    c = pipe.components
    return make_record(sf, seed=seed, width=width, height=height, model=c.source, lcm_lora=c.lcm_lora,
                       vae=c.vae_source, config=c.config, device=str(pipe.device), steps=step_count(sf.scene),
                       dtype=dtype_name(pipe.dtype), timings=timings, files=files, family=pipe.family.name,
                       tile_size=pipe.family.tile_size(height, width))


def scene_stream(sf: SceneFile, pipe: StableMultiDiffusionPipeline, *, cfg_type: str = defaults.STREAM_CFG_TYPE,
                 overlap_decode: bool = False, compile: bool = False,
                 masks: SceneMasks | None = None, allow_large: bool = False) -> StreamMultiDiffusion:
    """A stream set up from a scene: its canvas, settings, background and layers, flushed; `masks`
    given are used instead of reading the scene's files. The scene keys a stream has no use for
    (STREAM_IGNORED) are each named in a warning."""
    from smd_cli.engine.stream import StreamMultiDiffusion

    s = sf.scene
    if masks is None:
        width, height = checked_canvas(sf, pipe.vae_scale_factor)
        masks = scene_masks(sf, width, height)
    else:
        width, height = masks.width, masks.height
        check_divisible(width, height, pipe.vae_scale_factor)
    ignored = [f"{key}: {getattr(s, key)}" for key, unused in STREAM_IGNORED.items() if unused(getattr(s, key))]
    lcm = s.scheduler == "lcm"  # another scheduler's steps are not LCM steps: the stream takes its default
    if not lcm and s.steps is not None:
        ignored.insert(1, f"steps: {s.steps}")
    if ignored:
        warnings.warn(f"{sf.name}: a stream samples with LCM over its own views; it ignores {', '.join(ignored)}",
                      stacklevel=2)
    # Streams default to continuous masks (docs/method.md §7) unless the scene chose.
    mask_type = s.mask_type if "mask_type" in s.model_fields_set else defaults.STREAM_MASK_TYPE
    stream = StreamMultiDiffusion(
        pipeline=pipe, height=height, width=width, cfg_type=cfg_type, guidance_scale=s.guidance_scale,
        autoflush=False, mask_type=mask_type, bootstrap_steps=s.bootstrap.steps,
        bootstrap_mix_steps=s.bootstrap.mix_steps, bootstrap_leak_sensitivity=s.bootstrap.leak_sensitivity,
        bootstrap_centre=s.bootstrap.centre, cover_alpha=s.cover_alpha,
        seed=s.seed if s.seed is not None else defaults.STREAM_SEED, num_inference_steps=s.steps if lcm else None,
        timesteps=s.timesteps, tile_size=s.tile_size, overlap_decode=overlap_decode, compile=compile,
        loras=scene_lora_set(sf, s.loras), controlnets=control_specs(sf, masks, s.controlnet, ("controlnet",)),
        negative_auto=s.negative_auto, reference=reference_spec(sf, masks, s.reference, ("reference",)),
        allow_large=allow_large, region_mode=s.region_mode, circular=s.circular)
    apply_scene(stream, sf, masks)
    stream.flush()
    stream.autoflush = True
    return stream


# Scene keys a stream has no use for, each with the test of a value that asks for what it cannot do.
STREAM_IGNORED = {"scheduler": lambda v: v != "lcm", "tile_stride": lambda v: v is not None,
                  "tile_weighting": lambda v: v != defaults.TILE_WEIGHTING, "region_crop": bool,
                  "timestep_spacing": lambda v: v is not None, "true_cfg_scale": lambda v: v is not None,
                  "vae_tiles": lambda v: v not in (None, "auto"), "hires": lambda v: v is not None}
# Scene keys a stream takes when it starts (and those it ignores): edits to them need a restart,
# which `restart_needed` names. Prompts, masks and the background change while it runs.
STREAM_FIXED = ("model", "lcm_lora", "vae", "loras", "controlnet", "embeddings", "reference", "negative_auto",
                "width", "height", "seed", "steps", "timesteps", "guidance_scale",
                "mask_type", "cover_alpha", "tile_size", "region_mode", "circular", *STREAM_IGNORED, "bootstrap")


def restart_needed(running: SceneFile, edited: SceneFile) -> list[str]:
    """The settings of an edited scene that a running stream cannot take: they need a restart."""
    return [key for key in STREAM_FIXED if getattr(running.scene, key) != getattr(edited.scene, key)]


def apply_scene(stream: StreamMultiDiffusion, sf: SceneFile, masks: SceneMasks | None = None) -> list[str]:
    """Turn the differences between the stream and a (re)loaded scene (with its `masks`, read from
    its files when not given) into layer updates.

    Returns a description of what changed. The stream keeps running: no model reload, no restart.
    """
    if masks is None:
        masks = scene_masks(sf, stream.width, stream.height)
    stream.check_work(len(masks.names))  # before any change: a refused scene leaves the stream as it was
    load_scene_models(stream.pipe, sf)
    request = scene_request(sf, masks)
    layers = request.layers
    changes: list[str] = []
    flush, stream.autoflush = stream.autoflush, False
    try:
        picture = request.picture  # without one, the background prompt paints the uncovered area
        if picture is None and stream.background_image is not None:
            stream.remove_background_image()
            changes.append("background image removed")
        elif picture is not None and (stream.background_image is None
                                      or picture.tobytes() != stream.background_image.tobytes()):
            stream.update_background(picture)
            changes.append("background image")
        if (request.background_prompt != (stream.background_prompt or "")
                or request.background_negative_prompt != stream.background_negative_prompt):
            stream.update_background(prompt=request.background_prompt,
                                     negative_prompt=request.background_negative_prompt)
            changes.append("background prompt")
        for i, name in enumerate(masks.names):
            fields = dict(prompt=layers.prompts[i], negative_prompt=layers.negatives[i],
                          mask_strength=layers.strengths[i], mask_std=layers.stds[i],
                          prompt_strength=layers.prompt_strengths[i], loras=layers.loras[i],
                          controlnets=tuple(layers.controlnets[i]), reference=layers.references[i])
            if i >= len(stream.layers):
                stream.update_single_layer(i, mask=layers.masks[i], **fields)
                changes.append(f"added {name}")
                continue
            current = stream.layers[i]
            edits = {k: v for k, v in fields.items() if getattr(current, k) != v}
            if "reference" in edits and edits["reference"] is None:
                edits["reference"] = False  # removed: None would mean "unchanged"
            mask_changed = current.mask is None or not np.array_equal(current.mask, layers.masks[i])
            if edits or mask_changed:
                stream.update_single_layer(i, mask=layers.masks[i] if mask_changed else None, **edits)
                changes.append(f"{name}: " + ", ".join(list(edits) + (["mask"] if mask_changed else [])))
        while len(stream.layers) > len(layers.prompts):
            stream.remove_single_layer(len(stream.layers) - 1)
            changes.append("removed a layer")
    finally:
        stream.autoflush = flush
    if changes and flush:
        stream.flush()
    return changes
