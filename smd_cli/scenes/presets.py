"""Model presets: one name for a model and the sampling recipe it was made for.

`model: flux-schnell` (or `--model flux-schnell`) stands for a hub id with its scheduler, step
count and guidance scale; keys the scene sets itself win. A preset is expanded where a scene is
planned, so the image's record holds the hub id and the settings, never the preset's name:
`smd reproduce` does not depend on this table. `smd models` lists the presets. No torch at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from smd_cli.core import defaults
from smd_cli.families import StableDiffusion, StableDiffusionXL, named

if TYPE_CHECKING:
    from smd_cli.method.views import Grid


@dataclass(frozen=True)
class Preset:
    """A model and its recipe; `settings` are scene keys, `downloads` what `hf download` fetches."""

    model: str
    family: str
    settings: dict[str, Any]
    downloads: tuple[str, ...]
    gpu_memory: str  # what it needs on a GPU, as published for the model's own pipeline
    dtype: str = "float16"
    lcm_lora: str = "none"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_SD = ('--include "*.json" "*.txt" "*/diffusion_pytorch_model.safetensors" "text_encoder*/model*.safetensors"')
_DIT = ('--include "*.json" "*.txt" "*.model" "transformer/*.safetensors" "vae/*.safetensors" '
        '"text_encoder*/*.safetensors"')  # a transformer, its VAE, and CLIP and T5 with their tokenizers
PRESETS: dict[str, Preset] = {
    "sd15-lcm": Preset(defaults.MODEL, "sd", {"scheduler": "lcm", "steps": 5, "guidance_scale": 1.0},
                       (f"{defaults.MODEL} {_SD}", f"{StableDiffusion.lcm_lora} --include \"*.safetensors\""),
                       "about 4 GiB", lcm_lora=StableDiffusion.lcm_lora, note="smd's default"),
    "sdxl-lcm": Preset("stabilityai/stable-diffusion-xl-base-1.0", "sdxl",
                       {"scheduler": "lcm", "steps": 6, "guidance_scale": 1.0},
                       (f"stabilityai/stable-diffusion-xl-base-1.0 {_SD}",
                        f"{StableDiffusionXL.lcm_lora} --include \"*.safetensors\""),
                       "about 10 GiB", lcm_lora=StableDiffusionXL.lcm_lora),
    "sdxl-lightning": Preset("stabilityai/stable-diffusion-xl-base-1.0", "sdxl",
                             {"scheduler": "euler", "timestep_spacing": "trailing", "steps": 4, "guidance_scale": 1.0},
                             (f"stabilityai/stable-diffusion-xl-base-1.0 {_SD}",
                              "ByteDance/SDXL-Lightning sdxl_lightning_4step_lora.safetensors"),
                             "about 10 GiB", lcm_lora="ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"),
    "sd35-large-turbo": Preset("stabilityai/stable-diffusion-3.5-large-turbo", "sd3",
                               {"scheduler": "euler", "steps": 4, "guidance_scale": 1.0},
                               (f"stabilityai/stable-diffusion-3.5-large-turbo {_DIT}",),
                               "about 28 GiB", dtype="bfloat16", note="gated on the hub: accept its licence"),
    "flux-schnell": Preset("black-forest-labs/FLUX.1-schnell", "flux", {"scheduler": "euler", "steps": 4,
                                                                        "guidance_scale": 1.0},
                           (f"black-forest-labs/FLUX.1-schnell {_DIT}",),
                           "about 34 GiB", dtype="bfloat16"),
    "flux-dev": Preset("black-forest-labs/FLUX.1-dev", "flux", {"scheduler": "euler", "steps": 28,
                                                                "guidance_scale": 3.5},
                       (f"black-forest-labs/FLUX.1-dev {_DIT}",),
                       "about 34 GiB", dtype="bfloat16",
                       note="gated on the hub: accept its licence; guidance is embedded, negative prompts do nothing"),
}


def preset_of(model: str | None) -> Preset | None:
    return PRESETS.get(model) if model else None


def model_of(model: str | None) -> str | None:
    """The hub id a `model` value stands for (itself unless it names a preset)."""
    preset = preset_of(model)
    return preset.model if preset else model


def family_of_preset(model: str | None) -> str | None:
    """The family of a model that a preset names, known before it is downloaded."""
    return next((p.family for p in PRESETS.values() if p.model == model), None)


def model_grid(model: str | None, config: str | None = None) -> Grid | None:
    """What a model asks of a canvas (`smd_cli.models.loading.model_grid`), or, for a hub model a
    preset names that is not downloaded yet, what its family's does (every released family's VAE
    factor is 8). None where neither knows."""
    from smd_cli.models.loading import model_family
    from smd_cli.models.loading import model_grid as read_grid

    grid = read_grid(model, config)
    if grid is not None:
        return grid
    family = model_family(model, config) or family_of_preset(model)
    return None if family is None else named(family).grid_of({}, defaults.MODEL_VAE_FACTOR)


def lcm_lora_of(model: str | None) -> str | None:
    """The LoRA a preset fuses (None: not a preset)."""
    preset = preset_of(model)
    return preset.lcm_lora if preset else None


def expand(sf, model: str | None):
    """The scene with the preset `model` names (the run's choice of model) expanded: its hub id as
    `model`, and its settings where the scene (or an override) sets none. Not a preset: `sf`."""
    from smd_cli.scenes.scene import SceneFile

    preset = preset_of(model)
    if preset is None:
        return sf
    chosen = sf.scene.model_fields_set
    update = {key: value for key, value in preset.settings.items() if key not in chosen}
    if "steps" in update and "timesteps" in chosen:
        del update["steps"]
    update["model"] = preset.model
    if "lcm_lora" not in chosen:
        update["lcm_lora"] = preset.lcm_lora
    scene = sf.scene.model_copy(update=update)
    return SceneFile(scene, sf.path, sf.lines, sf.overridden, sf.label)


def table() -> list[dict[str, str]]:
    """The presets as `smd models` lists them."""
    rows = []
    for name, p in PRESETS.items():
        recipe = ", ".join(f"{k} {v}" for k, v in p.settings.items())
        rows.append({"name": name, "model": p.model, "family": named(p.family).label,
                     "recipe": recipe + ("" if p.lcm_lora == "none" else f", LoRA {p.lcm_lora}"),
                     "dtype": p.dtype, "gpu_memory": p.gpu_memory,
                     "downloads": "; ".join(f"hf download {d}" for d in p.downloads), "note": p.note})
    return rows
