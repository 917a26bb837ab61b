"""LoRAs over the whole canvas and over single layers, as named adapters on the loaded model.

Region tools that steer attention cannot give one region its own LoRA; smd can, because each
layer is denoised in rows of its own (docs/method.md §3): the rows of a layer with LoRAs run with those
adapters active, the others without. diffusers' denoisers take one set of active adapters per
forward call (peft's per-row adapter names reach transformers' models, not diffusers'), so
`StableDiffusion.predict` groups a batch's rows by their set and makes one call per group;
BENCHMARKS.md has what that costs.

Loading goes through diffusers' own `load_lora_weights` on a pipeline object wrapped around the
loaded modules, which reads every LoRA format it reads (diffusers', kohya's, A1111's) into the
denoiser and the text encoders. The canvas's LoRAs (`loras:` at the top of a scene) act on the
text encoders as well; a layer's act on its denoiser rows only, since every prompt is encoded by
the one set of text encoders.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Lora:
    """A LoRA and the scale it acts at: `source` is a file, a folder, a hub id or a hub id with
    its file (`owner/name/file.safetensors`)."""

    source: str
    scale: float = 1.0


LoraSet = tuple[Lora, ...]


class LoraAdapters:
    """The LoRAs loaded into one model, each once, and which of them act now."""

    def __init__(self, components):
        self.components = components
        self.names: dict[str, str] = {}  # source -> adapter name
        self._loader = None
        self._active: LoraSet | None = None  # on the denoiser; None: unknown

    @property
    def denoiser(self):
        denoiser = self.components.denoiser
        return getattr(denoiser, "_orig_mod", denoiser)  # torch.compile keeps the module

    def loader(self):
        """A diffusers pipeline of the family over the loaded modules: its LoRA loading and adapter
        switching are the library's."""
        if self._loader is None:
            import inspect

            import diffusers

            from smd_cli.families import named

            c = self.components
            family = named(c.family)
            cls = getattr(diffusers, family.pipeline)
            accepted = inspect.signature(cls.__init__).parameters
            parts = {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer,
                     "scheduler": diffusers.FlowMatchEulerDiscreteScheduler() if family.flow
                     else diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
                     "transformer" if "transformer" in accepted else "unet": self.denoiser}
            if "safety_checker" in accepted:
                parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            for extra in ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
                if extra in accepted:
                    parts[extra] = getattr(c, extra)
            self._loader = cls(**parts)
        return self._loader

    def load(self, loras: Sequence[Lora], where: str = "LoRA") -> None:
        """Load each LoRA not loaded yet, as an adapter named after its source; `where` names the
        setting in errors (a scene key)."""
        from smd_cli.models.loading import load_lora

        for lora in loras:
            if lora.source in self.names:
                continue
            name = "smd-" + hashlib.sha256(lora.source.encode()).hexdigest()[:12]
            with warnings.catch_warnings():  # peft notes each adapter after the first: that is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_lora(self.loader(), lora.source, where, adapter_name=name)
            self.names[lora.source] = name
            self._active = None

    def activate(self, loras: LoraSet) -> None:
        """Make exactly these LoRAs act on the denoiser, at their scales (none: the base model)."""
        if loras == self._active or (not loras and not self.names):
            return
        if loras:
            self.denoiser.enable_lora()
            self.denoiser.set_adapters([self.names[x.source] for x in loras], weights=[x.scale for x in loras])
        else:
            self.denoiser.disable_lora()
        self._active = loras

    def for_text(self, loras: LoraSet) -> None:
        """Make exactly these LoRAs act on the text encoders. diffusers sets the denoiser's with
        them; `activate` sets those again before the denoiser's next call."""
        if not self.names:
            return
        loader = self.loader()
        if loras:
            loader.enable_lora()
            loader.set_adapters([self.names[x.source] for x in loras], adapter_weights=[x.scale for x in loras])
        else:
            loader.disable_lora()
        self._active = None


def as_loras(value) -> LoraSet:
    """LoRAs as the Python API takes them: a source, a `Lora`, a (source, scale) pair, a mapping
    with `path` (or `source`) and `scale`, or a list of these; None for none."""
    if value is None:
        return ()
    if isinstance(value, (str, Path, Lora, dict)) or (isinstance(value, tuple) and len(value) == 2
                                                      and isinstance(value[1], (int, float))):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, Lora):
            out.append(item)
        elif isinstance(item, (str, Path)):
            out.append(Lora(str(item)))
        elif isinstance(item, dict):
            out.append(Lora(str(item.get("path", item.get("source"))), float(item.get("scale", 1.0))))
        else:
            source, scale = item
            out.append(Lora(str(source), float(scale)))
    return tuple(out)


def describe(loras: LoraSet) -> str:
    return ", ".join(f"{Path(x.source).name}@{x.scale:g}" for x in loras) or "none"


__all__ = ["Lora", "LoraSet", "LoraAdapters", "as_loras"]
