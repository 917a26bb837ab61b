"""Reference images per layer, through an IP-Adapter.

diffusers' `load_ip_adapter` loads the adapter (its image projection and the key/value
projections it adds to the UNet's cross-attention) and its CLIP image encoder. Each row then gets
the image embedding of its own layer's reference: the rows of a layer with a reference its
image's embedding (and, as diffusers does for the unconditional pass, zeros on the unconditional
rows), the rows of a layer without one zeros at scale 0. The adapter's scale is one number per
denoiser call, so `StableDiffusion.predict` groups rows by it (rows of one scale share a call,
each with its own image). A reference over the whole canvas (`reference:` at the top of a scene)
acts on every row whose layer has none of its own. On FLUX.1 (XLabs' IP-Adapter, diffusers'
`FluxIPAdapterMixin`) the unconditional rows of true CFG see a black picture, as diffusers'.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from smd_cli.core.errors import ModelError

if TYPE_CHECKING:
    from smd_cli.families import Family


@dataclass(frozen=True)
class Reference:
    """What a row's image embedding is: a reference image's (`key`), or zeros (None), and the
    adapter's scale in its call."""

    key: str | None
    scale: float


@dataclass
class ReferenceSpec:
    """A reference image as a request names it, its scale, and the IP-Adapter (None: the family's)."""

    image: Any  # a PIL image
    scale: float = 1.0
    adapter: str | None = None


def as_reference(value) -> ReferenceSpec | None:
    """A reference as the Python API takes it: a `ReferenceSpec`, a mapping with `image` and
    optionally `scale` and `adapter`, a PIL image, or None."""
    if value is None or isinstance(value, ReferenceSpec):
        return value
    if isinstance(value, dict):
        return ReferenceSpec(**value)
    return ReferenceSpec(value)


def split_source(source: str) -> tuple[str, str, str]:
    """An IP-Adapter as `load_ip_adapter` takes it: (repository or folder, subfolder, file) from a
    local weights file (its `image_encoder/` beside it) or `owner/name/sub/file.safetensors`."""
    from smd_cli.core.files import expand_user
    from smd_cli.models.loading import hub_file

    hub = hub_file(source)
    if hub is not None:
        repo, file = hub
        sub, _, name = file.rpartition("/")
        return repo, sub, name
    path = expand_user(source)
    return str(path.parent), "", path.name


class References:
    """The IP-Adapter loaded into one model (at most one) and the reference images' embeddings."""

    def __init__(self, loader, family: type[Family], device: torch.device, dtype: torch.dtype):
        self.loader, self.family, self.device, self.dtype = loader, family, device, dtype
        self.adapter: str | None = None
        self.embeds: dict[str, torch.Tensor] = {}  # key -> [1, D]
        self._scale: float | None = None

    def load(self, adapter: str | None) -> str:
        """Load the IP-Adapter (default: the family's) once; a second, different one is refused."""
        from smd_cli.core.files import expand_user, is_file
        from smd_cli.models.loading import _loading, _offline, _silenced, hub_file

        source = adapter or self.family.ip_adapter
        if source is None:
            raise ModelError(f"reference images need an IP-Adapter, and {self.family.label} has "
                             "none here")
        if self.adapter is not None:
            if source != self.adapter:
                raise ModelError(f"IP-Adapter {source} asked for, but {self.adapter} is loaded: one IP-Adapter serves "
                                 "every reference image of a run")
            return source
        if hub_file(source) is None and not is_file(expand_user(source)):
            raise ModelError(f"IP-Adapter file not found: {expand_user(source)}")
        repo, sub, name = split_source(source)
        name_ = self.family.label
        loader = self.loader()
        local = hub_file(source) is None
        options = {}
        if self.family.ip_adapter_encoder:  # XLabs' layout: the image encoder is a repository of its own
            encoder = str(Path(repo) / "image_encoder") if local else self.family.ip_adapter_encoder
            options = dict(image_encoder_pretrained_model_name_or_path=encoder, image_encoder_dtype=self.dtype)
        with _loading(source, "IP-Adapter"), _silenced("diffusers"):
            try:
                loader.load_ip_adapter(repo, subfolder=sub, weight_name=name, local_files_only=local or _offline(),
                                       **options)
            except (RuntimeError, ValueError) as exc:
                loader.register_modules(image_encoder=None, feature_extractor=None)  # a later try starts afresh
                if "size mismatch" not in str(exc) and "expected shape" not in str(exc):
                    raise
                raise ModelError(f"IP-Adapter '{source}' does not fit this {name_} model: its layers have other "
                                 "sizes (an IP-Adapter for another model family?)") from None
        self.adapter = source
        return source

    @torch.no_grad()
    def add(self, spec: ReferenceSpec) -> Reference:
        """The image's embedding by the adapter's image encoder, remembered; the row's `Reference`."""
        self.load(spec.adapter)
        loader = self.loader()
        pixels = loader.feature_extractor(spec.image.convert("RGB"), return_tensors="pt").pixel_values
        key = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16]
        if key not in self.embeds:
            encoder = loader.image_encoder
            self.embeds[key] = encoder(pixels.to(self.device, encoder.dtype)).image_embeds
        return Reference(key, float(spec.scale))

    def negative(self, scale: float) -> Reference:
        """What a reference's unconditional rows see, as diffusers gives it: zeros on SD 1.x and
        SDXL, a black picture's embedding on FLUX.1."""
        if not self.family.black_negative_reference:
            return Reference(None, scale)
        from PIL import Image

        return Reference(self.add(ReferenceSpec(Image.new("RGB", (64, 64)), scale, self.adapter)).key, scale)

    def inputs(self, rows: Sequence[Reference | None], batch: int) -> torch.Tensor:
        """The image embeddings [B, 1, D] of a call's rows (zeros where a row has none), its
        adapter scale set."""
        width = next(iter(self.embeds.values())).shape[-1] if self.embeds else self._width()
        out = torch.zeros(batch, 1, width, device=self.device, dtype=self.dtype)
        for i, ref in enumerate(rows):
            if ref is not None and ref.key is not None:
                out[i, 0] = self.embeds[ref.key][0].to(self.dtype)
        scale = next((r.scale for r in rows if r is not None), 0.0)
        if scale != self._scale:
            self.loader().set_ip_adapter_scale(scale)
            self._scale = scale
        return out

    def _width(self) -> int:
        return int(self.loader().image_encoder.config.projection_dim)
