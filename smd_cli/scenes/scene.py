"""Scene files: YAML parsed safely into pydantic models, with every error located by line and key.

A scene is the user's whole request: canvas, sampler settings, a background and ordered layers,
each a prompt with a mask. Paths inside a scene are relative to the scene file. Nothing here
imports torch, so `smd validate` stays instant.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from smd_cli.core import defaults
from smd_cli.core.errors import SceneError, SmdError
from smd_cli.method import prompts
from smd_cli.method.views import vae_tiles_setting

# A scene is a few hundred nodes, four or five levels deep; far beyond either means YAML aliases
# expanding out of control, or referring to themselves.
MAX_NODES = 100_000
MAX_DEPTH = 64
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML was built with it
# What PyYAML's contexts mean, for "not valid YAML: ..., in a quoted string that starts here".
YAML_CONTEXTS = {"while scanning a quoted scalar": "a quoted string",
                 "while parsing a flow sequence": "a [ list", "while parsing a flow mapping": "a { mapping",
                 "while parsing a block mapping": "the mapping", "while parsing a block collection": "the list",
                 "while scanning a simple key": "a key", "while scanning a block scalar": "a block of text"}

Unit = Annotated[float, Field(strict=True, ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(strict=True, ge=0.0)]
Number = Annotated[float, Field(strict=True)]
KeyPath = tuple[Union[str, int], ...]


def parse_color(value: Any) -> str:
    """Normalise `#rgb` / `#rrggbb` to `#rrggbb`."""
    if not isinstance(value, str) or not re.fullmatch(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})", value):
        raise ValueError(f"expected a colour like \"#e757b0\", got {value!r}")
    hexpart = value[1:]
    if len(hexpart) == 3:
        hexpart = "".join(c * 2 for c in hexpart)
    return "#" + hexpart.lower()


Color = Annotated[str, BeforeValidator(parse_color)]


def parse_prompt(value: Any) -> Any:
    """A prompt whose weight syntax parses (`smd_cli.method.prompts`); other values are pydantic's to refuse."""
    if isinstance(value, str):
        try:
            prompts.check(value)
        except prompts.PromptSyntaxError as exc:
            raise ValueError(f"prompt weights do not parse: {exc}") from None
    return value


Prompt = Annotated[str, AfterValidator(parse_prompt)]


def parse_circular(value: Any) -> Any:
    """`circular`: x, y, both, or a boolean (true meant x before y existed; false is none)."""
    if isinstance(value, bool) or value in defaults.CIRCULAR_AXES:
        return value
    raise ValueError(f"must be x (left and right join: a 360-degree panorama), y (top and bottom), both (a "
                     f"seamless texture) or false, got {value!r}")


def parse_vae_tiles(value: Any) -> Any:
    """`vae_tiles`: a tile in pixels, off (YAML's bare `off` is false) or auto (as left out)."""
    try:
        return vae_tiles_setting(value)
    except SmdError as exc:
        raise ValueError(str(exc).removeprefix("vae_tiles ")) from None


Circular = Annotated[Union[StrictBool, Literal[defaults.CIRCULAR_AXES]],  # type: ignore[valid-type]
                     BeforeValidator(parse_circular)]
VaeTiles = Annotated[Union[StrictInt, Literal["off"], None], BeforeValidator(parse_vae_tiles)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# A file's SHA-256 in hex: recorded in the scenes smd writes into its images, checked when present.
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ImageMask(_Model):
    """A mask image: its alpha channel where it has one, else its luminance."""

    image: str
    invert: StrictBool = False
    threshold: Unit | None = 0.5
    sha256: Sha256 | None = None


class PaletteMask(_Model):
    """One colour of a colour-coded image; each pixel goes to the nearest listed colour."""

    palette: str
    color: Color
    background_color: Color = "#000000"
    sha256: Sha256 | None = None


def _box(names: str, check):
    """A validator for four numbers [names] that `check(values)` accepts (or names the problem of)."""
    def validate(cls, v):
        if len(v) != 4:
            raise ValueError(f"needs 4 numbers [{names}], got {v}")
        problem = check(v)
        if problem:
            raise ValueError(f"{problem}, got {list(v)}")
        return v

    return classmethod(validate)


class RectMask(_Model):
    """`[x0, y0, x1, y1]` in pixels, or as fractions of the canvas when all are within [0, 1]."""

    rect: list[Number]

    _ordered = field_validator("rect")(_box("x0, y0, x1, y1", lambda v: (v[2] <= v[0] or v[3] <= v[1])
                                            and "needs x0 < x1 and y0 < y1"))


class EllipseMask(_Model):
    """`[cx, cy, rx, ry]` in pixels, or as fractions of the canvas when all are within [0, 1]."""

    ellipse: list[Number]

    _positive_radii = field_validator("ellipse")(_box("cx, cy, rx, ry", lambda v: (v[2] <= 0 or v[3] <= 0)
                                                      and "radii rx and ry must be positive"))


MASK_FORMS = {"image": ImageMask, "palette": PaletteMask, "rect": RectMask, "ellipse": EllipseMask}


def _mask_form(value: Any) -> str | None:
    if isinstance(value, dict):
        found = [key for key in MASK_FORMS if key in value]
        return found[0] if len(found) == 1 else None
    if isinstance(value, BaseModel):
        return next((k for k, cls in MASK_FORMS.items() if isinstance(value, cls)), None)
    return None


def _mask_from_path(value: Any) -> Any:
    return {"image": value} if isinstance(value, str) else value


MaskSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(key)] for key, cls in MASK_FORMS.items())],  # type: ignore[misc]
    Discriminator(
        _mask_form,
        custom_error_type="mask_form",
        custom_error_message=(
            "a mask is a path, or a mapping with exactly one of the keys image, palette, rect, ellipse"
        ),
    ),
    BeforeValidator(_mask_from_path),
]


class LoraSpec(_Model):
    """A LoRA: a file, a folder, a hub id or `owner/name/file.safetensors`, at a scale."""

    path: str
    scale: Annotated[float, Field(strict=True, ge=-defaults.MAX_LORA_SCALE, le=defaults.MAX_LORA_SCALE)] = 1.0
    sha256: Sha256 | None = None


def _lora_from_path(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


LoraEntry = Annotated[LoraSpec, BeforeValidator(_lora_from_path)]


class ControlNetSpec(_Model):
    """A ControlNet: its model (hub id or folder), a control image, its scale and the fraction of
    the steps it acts in."""

    model: str
    image: str
    scale: Annotated[float, Field(strict=True, ge=0.0, le=defaults.MAX_CONTROL_SCALE)] = 1.0
    start: Unit = 0.0
    end: Unit = 1.0
    sha256: Sha256 | None = None  # the image's

    @model_validator(mode="after")
    def _ordered(self):
        if self.start >= self.end:
            raise ValueError(f"start {self.start} must be before end {self.end} (fractions of the steps)")
        return self


class ReferenceImage(_Model):
    """A reference image through an IP-Adapter (default: the model family's), at a scale."""

    image: str
    scale: Annotated[float, Field(strict=True, ge=0.0, le=defaults.MAX_CONTROL_SCALE)] = 1.0
    adapter: str | None = None
    sha256: Sha256 | None = None  # the image's


def _reference_from_path(value: Any) -> Any:
    return {"image": value} if isinstance(value, str) else value


ReferenceEntry = Annotated[ReferenceImage, BeforeValidator(_reference_from_path)]


class EmbeddingSpec(_Model):
    """A textual-inversion embedding file and the token prompts say it with (default: its name)."""

    path: str
    token: Annotated[str, Field(pattern=r"^\S+$")] | None = None
    sha256: Sha256 | None = None


def _embedding_from_path(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


EmbeddingEntry = Annotated[EmbeddingSpec, BeforeValidator(_embedding_from_path)]


class Bootstrap(_Model):
    """Bootstrapping (docs/method.md §3.2, 3.5): the first steps see each layer alone on a flat background."""

    steps: Annotated[StrictInt, Field(ge=0, le=defaults.MAX_STEPS)] = defaults.BOOTSTRAP_STEPS
    mix_steps: NonNegative = defaults.BOOTSTRAP_MIX_STEPS
    leak_sensitivity: NonNegative | None = defaults.LEAK_SENSITIVITY
    centre: StrictBool = defaults.BOOTSTRAP_CENTRE


class Hires(_Model):
    """A second pass (docs/large-pictures.md "Two passes: hires"): the image upscaled `scale` times and
    denoised again from `strength` with the same layers; the larger canvas must pass the same size
    and work limits as any canvas (`canvas.check_hires`)."""

    scale: Annotated[float, Field(strict=True, gt=1.0)]
    strength: Unit = defaults.HIRES_STRENGTH
    steps: Annotated[StrictInt, Field(ge=1, le=defaults.MAX_STEPS)] | None = None  # None: the scene's
    controlnet: str | None = None  # a tile ControlNet fed the upscaled first image
    controlnet_scale: Annotated[float, Field(strict=True, ge=0.0, le=defaults.MAX_CONTROL_SCALE)] = 1.0


class Background(_Model):
    """The area no layer covers, and the prompt layers are mixed toward (docs/method.md §1, 2.1).

    With an `image` (inpainting), the uncovered area keeps that picture instead.
    """

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    image: str | None = None
    image_sha256: Sha256 | None = None


class Layer(_Model):
    """A semantic brush: a prompt painted through a mask."""

    name: str | None = None
    prompt: Prompt
    negative_prompt: Prompt = ""
    mask: MaskSpec | None = None
    mask_strength: Unit = defaults.MASK_STRENGTH
    mask_std: Annotated[float, Field(strict=True, ge=0.0, le=256.0)] = defaults.MASK_STD
    prompt_strength: Unit = defaults.PROMPT_STRENGTH
    loras: list[LoraEntry] = []  # act on this layer's rows only
    controlnet: list[ControlNetSpec] = []  # act on this layer's rows only
    reference: ReferenceEntry | None = None  # an image this layer's rows see through an IP-Adapter


class Scene(_Model):
    """A whole generation request. Every default is docs/method.md §7's."""

    model: str | None = None
    lcm_lora: str | None = None
    vae: str | None = None
    loras: list[LoraEntry] = []  # act on the whole canvas, text encoders included
    controlnet: list[ControlNetSpec] = []  # act on the whole canvas
    embeddings: list[EmbeddingEntry] = []  # textual inversions, said in prompts by their tokens
    reference: ReferenceEntry | None = None  # for every layer without a reference of its own
    width: Annotated[StrictInt, Field(ge=defaults.MIN_SIZE, le=defaults.MAX_SIZE)] | None = None
    height: Annotated[StrictInt, Field(ge=defaults.MIN_SIZE, le=defaults.MAX_SIZE)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=defaults.SEED_LIMIT)] | None = None
    steps: Annotated[StrictInt, Field(ge=1, le=defaults.MAX_STEPS)] | None = None
    timesteps: Annotated[list[Annotated[StrictInt, Field(ge=0, le=9999)]], Field(min_length=1)] | None = None
    scheduler: Literal[defaults.SCHEDULERS] = defaults.SCHEDULER  # type: ignore[valid-type]
    timestep_spacing: Literal[defaults.TIMESTEP_SPACINGS] | None = None  # type: ignore[valid-type]
    guidance_scale: Annotated[float, Field(strict=True, ge=0.0,
                                           le=defaults.MAX_GUIDANCE_SCALE)] = defaults.GUIDANCE_SCALE
    true_cfg_scale: Annotated[float, Field(strict=True, ge=0.0, le=defaults.MAX_GUIDANCE_SCALE)] | None = None
    mask_type: Literal[defaults.MASK_TYPES] = defaults.MASK_TYPE  # type: ignore[valid-type]
    cover_alpha: Unit = defaults.COVER_ALPHA
    tile_size: Annotated[StrictInt, Field(ge=defaults.MIN_SIZE, le=defaults.MAX_SIZE)] | None = None  # the model's
    tile_stride: Annotated[StrictInt, Field(ge=1, le=defaults.MAX_SIZE)] | None = None
    tile_weighting: Literal[defaults.TILE_WEIGHTINGS] = defaults.TILE_WEIGHTING  # type: ignore[valid-type]
    circular: Circular = False  # x, y, both (docs/large-pictures.md); true is x
    region_crop: StrictBool = False
    region_mode: Literal[defaults.REGION_MODES] = defaults.REGION_MODE  # type: ignore[valid-type]
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    vae_tiles: VaeTiles = None  # the VAE's tile in pixels, off, or left out: smd chooses
    hires: Hires | None = None  # a second pass on a larger canvas
    negative_prefix: str | None = None
    negative_auto: StrictBool = False  # each layer's prompt a negative prompt of the other layers' rows
    background: Background = Field(default_factory=Background)
    layers: Annotated[list[Layer], Field(min_length=1)]
    output: str | None = None


# The model class that holds the keys at each place of the document, for "did you mean".
_NESTED: dict[type[BaseModel], dict[str, type[BaseModel]]] = {
    Scene: {"bootstrap": Bootstrap, "background": Background, "layers": Layer, "hires": Hires},
}


@dataclass
class SceneFile:
    """A validated scene with where it came from, so later stages can point at lines."""

    scene: Scene
    path: Path | None = None
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overridden: set[KeyPath] = field(default_factory=set)
    label: str = "prompt"  # the name of a scene that has no file

    @property
    def name(self) -> str:
        return self.path.stem if self.path else self.label

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def source(self, value: str | None) -> str | None:
        """A model, LoRA or VAE setting: a path relative to the scene file when one exists there,
        else as written (a hub id, or a keyword such as `tiny`)."""
        if value is None or self.path is None:
            return value
        from smd_cli.core.files import exists

        candidate = self.resolve(value)
        return str(candidate) if exists(candidate) else value

    def resolve(self, relative: str) -> Path:
        """A path from the scene, relative to the scene file's folder."""
        from smd_cli.core.files import expand_user

        p = expand_user(relative)
        return p if p.is_absolute() else self.base_dir / p

    def error(self, key: KeyPath, message: str) -> SceneError:
        """An error located at `key`: its line, or a note that it came from the command line."""
        if any(key[: len(o)] == o or o[: len(key)] == key for o in self.overridden):
            message += " (set on the command line)"
            return SceneError(message, file=self.path, key=format_key(key))
        return SceneError(message, file=self.path, line=find_line(self.lines, key), key=format_key(key))


def format_key(key: KeyPath) -> str:
    """('layers', 1, 'mask') -> 'layers[1].mask'."""
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def find_line(lines: dict[KeyPath, int], key: KeyPath) -> int | None:
    """The line of the deepest part of `key` present in the document."""
    for n in range(len(key), -1, -1):
        if key[:n] in lines:
            return lines[key[:n]]
    return None


def _yaml_error(exc: yaml.YAMLError, path: Path | None) -> SceneError:
    """A syntax error located where the broken construct starts (an unclosed quote, say), with the
    line where parsing stopped."""
    problem_mark, context_mark = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if context and context_mark and problem_mark and context_mark.line != problem_mark.line:
        what = YAML_CONTEXTS.get(context, context)
        return SceneError(f"not valid YAML: {problem} at line {problem_mark.line + 1}, in {what} that starts here",
                          file=path, line=context_mark.line + 1)
    mark = problem_mark or context_mark
    return SceneError(f"not valid YAML: {problem}", file=path, line=mark.line + 1 if mark else None)


def _too_deep(path: Path | None, what: str = "the document", line: int | None = None) -> SceneError:
    return SceneError(f"{what} nests more than {MAX_DEPTH} levels deep (or a YAML alias refers to a list or "
                      "mapping that contains it)", file=path, line=line)


def depth_within(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and mappings nest at most `limit` deep in `value`; a cycle never is."""
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (list, dict)):
            if depth >= limit:
                return False
            todo += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return True


def parse_mapping(text: str, path: Path | None = None, allow_empty: bool = False) -> tuple[dict, dict[KeyPath, int]]:
    """YAML text parsed with the safe loader, bounded in depth and aliases, with the line of every
    key; the caller checks that the data is the mapping it expects."""
    if allow_empty and not text.strip():
        return {}, {}
    return _index_lines(text, path)


def _index_lines(text: str, path: Path | None, loader_class=LOADER) -> tuple[Any, dict[KeyPath, int]]:
    """Parse YAML safely into data and a map from key path to (1-based) line: once, with libyaml
    where there is one; a syntax error is parsed again by PyYAML, whose messages say more."""
    loader = None
    try:
        try:
            loader = loader_class(text)  # composed into nodes, checked, then built from the same nodes
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's limit; PyYAML would take minutes
                raise _too_deep(path, line=exc.problem_mark.line + 1 if exc.problem_mark else None) from None
            if loader_class is not yaml.SafeLoader:
                return _index_lines(text, path, yaml.SafeLoader)
            raise _yaml_error(exc, path) from None
        except RecursionError:  # PyYAML composes nested collections recursively
            raise _too_deep(path) from None
        return _load(loader, root, path)
    finally:
        if loader is not None:
            loader.dispose()


def _load(loader, root: yaml.Node | None, path: Path | None) -> tuple[Any, dict[KeyPath, int]]:
    if root is None:
        raise SceneError("the scene file is empty; it needs at least `layers:`", file=path)

    lines: dict[KeyPath, int] = {}
    count = 0

    def walk(node: yaml.Node, key: KeyPath) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise SceneError(f"the document expands to more than {MAX_NODES} values "
                             "(YAML aliases nested too deep?)", file=path)
        if len(key) > MAX_DEPTH:
            raise _too_deep(path, line=node.start_mark.line + 1)
        lines.setdefault(key, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    raise SceneError("a key must be a plain word, not a list or mapping", file=path,
                                     line=k.start_mark.line + 1, key=format_key(key) or None)
                name = k.value
                if name in seen:
                    raise SceneError(f"key '{name}' appears twice", file=path,
                                     line=k.start_mark.line + 1, key=format_key(key + (name,)))
                seen.add(name)
                lines[key + (name,)] = k.start_mark.line + 1
                walk(v, key + (name,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, key + (i,))

    walk(root, ())
    try:
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:  # tags the safe loader refuses, keys that cannot be keys
        raise _yaml_error(exc, path) from None
    if not isinstance(data, dict):
        raise SceneError(f"a scene is a mapping of keys (model, layers, ...), not a {type(data).__name__}",
                         file=path, line=1)
    return data, lines


def parse_override(text: str) -> tuple[KeyPath, Any]:
    """`layers[1].prompt=a cat` -> (('layers', 1, 'prompt'), 'a cat'); the value is read as YAML."""
    if "=" not in text:
        raise SceneError(f"--set expects key.path=value, got {text!r}")
    key_text, value_text = text.split("=", 1)
    parts: list[str | int] = []
    for piece in re.split(r"\.|(?=\[)", key_text.strip()):
        if not piece:
            continue
        m = re.fullmatch(r"\[(\d+)\]", piece)
        parts.append(int(m.group(1)) if m else (int(piece) if piece.isdigit() else piece))
    if not parts or not isinstance(parts[0], str):
        raise SceneError(f"--set expects key.path=value, got {text!r}")
    try:
        # A leading # is a colour (#e757b0), not a YAML comment that would make the value null.
        value = yaml.load(value_text, Loader=LOADER) if value_text.strip() and not value_text.lstrip().startswith("#") \
            else value_text.strip()
    except yaml.YAMLError as exc:
        if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's limit
            raise _too_deep(None, f"--set {key_text.strip()}: the value") from None
        value = value_text
    except RecursionError:
        raise _too_deep(None, f"--set {key_text.strip()}: the value") from None
    if not depth_within(value):
        raise _too_deep(None, f"--set {key_text.strip()}: the value")
    return tuple(parts), value


def apply_override(data: dict, key: KeyPath, value: Any, path: Path | None) -> None:
    """Set `key` in the raw scene data, creating mappings on the way."""
    node: Any = data
    for i, part in enumerate(key[:-1]):
        nxt = key[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise SceneError(f"--set {format_key(key)}: there is no {format_key(key[: i + 1])}", file=path)
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise SceneError(f"--set {format_key(key)}: {format_key(key[:i])} is not a mapping", file=path)
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = key[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise SceneError(f"--set {format_key(key)}: there is no {format_key(key)}", file=path)
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        if not isinstance(node, dict):
            raise SceneError(f"--set {format_key(key)}: {format_key(key[:-1])} is not a mapping", file=path)
        node[last] = value


def _known_keys(loc: KeyPath) -> list[str]:
    """The keys allowed at the place of an unknown key, for "did you mean"."""
    model: type[BaseModel] = Scene
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if part in MASK_FORMS and model is Layer:
            model = MASK_FORMS[part]
            continue
        nested = _NESTED.get(model, {})
        if part in nested:
            model = nested[part]
    return list(model.model_fields)


def _clean_loc(loc: tuple) -> KeyPath:
    """Drop pydantic's union tags from a location (`layers.0.mask.palette.color`)."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "mask" and part in MASK_FORMS:
            continue
        out.append(part)
    return tuple(out)


def _describe(err: dict) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        known = _known_keys(tuple(err["loc"]))
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
        return f"unknown key '{name}'{hint}"
    if kind == "missing":
        return "this key is required"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "literal_error":
        return f"{msg[0].lower() + msg[1:]}, got {value!r}"
    text = msg[0].lower() + msg[1:]
    text = text.removeprefix("value error, ")
    if kind not in ("mask_form",) and not isinstance(value, (dict, list)) and ", got " not in text:
        text += f", got {value!r}"
    return text


def random_seed() -> int:
    """A seed for a scene without one, drawn from the system's randomness, and printed or recorded."""
    import random

    return random.SystemRandom().randrange(defaults.RANDOM_SEEDS)


def default_layer_name(index: int) -> str:
    """A layer's name when the scene gives none: `layer1`, `layer2`, ..."""
    return f"layer{index + 1}"


def validate_scene(data: dict, *, path: Path | None = None, lines: dict[KeyPath, int] | None = None,
                   overridden: set[KeyPath] | None = None) -> SceneFile:
    """Turn raw scene data into a `SceneFile`, raising the first problem as a `SceneError`."""
    holder = SceneFile(scene=None, path=path, lines=lines or {},  # type: ignore[arg-type]
                       overridden=overridden or set())
    try:
        scene = Scene.model_validate(data)
    except ValidationError as exc:
        raise SceneError.gather([holder.error(_clean_loc(e["loc"]), _describe(e))
                                 for e in _reported(exc.errors())]) from None
    holder.scene = scene
    problems = _check_consistency(holder)
    if problems:
        raise SceneError.gather(problems)
    return holder


def _reported(errors: list[dict]) -> list[dict]:
    """Pydantic's errors without the echoes of a misspelt key: `promt` is unknown, and then
    `prompt` is also missing; only the first is worth saying ("did you mean 'prompt'?")."""
    unknown: dict[tuple, list[str]] = {}  # by the mapping they are in: a missing key meets only its neighbours
    for e in errors:
        if e["type"] == "extra_forbidden":
            unknown.setdefault(tuple(e["loc"][:-1]), []).append(str(e["loc"][-1]))

    def echo(e: dict) -> bool:
        parent, name = tuple(e["loc"][:-1]), str(e["loc"][-1])
        return e["type"] == "missing" and any(
            difflib.get_close_matches(name, [other], cutoff=0.6) for other in unknown.get(parent, ()))

    return [e for e in errors if not echo(e)] or errors


def _check_consistency(sf: SceneFile) -> list[SceneError]:
    """What the scene's keys say together that no key says alone."""
    s = sf.scene
    problems: list[SceneError] = []
    if s.timesteps is not None:
        if any(b >= a for a, b in zip(s.timesteps, s.timesteps[1:])):
            problems.append(sf.error(("timesteps",), f"must be strictly decreasing, got {s.timesteps}"))
        if s.steps is not None and s.steps != len(s.timesteps):
            problems.append(sf.error(("steps",), f"says {s.steps} steps but timesteps lists {len(s.timesteps)}; "
                                                 "give one of them"))
    if s.timestep_spacing is not None and s.scheduler == "lcm":
        problems.append(sf.error(("timestep_spacing",), "applies to the ddim and euler schedulers; lcm spaces its "
                                                        "steps on its own grid (set scheduler: euler, or remove it)"))
    seen: dict[str, int] = {}
    for i, layer in enumerate(s.layers):
        if layer.name is None:
            layer.name = default_layer_name(i)
        if layer.name in seen:
            problems.append(sf.error(("layers", i, "name"), f"duplicate layer name '{layer.name}' (also "
                                                            f"layers[{seen[layer.name]}]); names must be unique"))
        seen.setdefault(layer.name, i)
    if s.tile_stride is not None and s.tile_size is not None and s.tile_stride > s.tile_size:
        problems.append(sf.error(("tile_stride",), f"{s.tile_stride} is larger than tile_size {s.tile_size}: "
                                                   "views would leave gaps"))
    for key in ("model", "lcm_lora", "vae", "output"):
        if getattr(s, key) is not None and not getattr(s, key).strip():
            problems.append(sf.error((key,), "must not be empty; leave the key out for the default"))
    if s.output is not None and s.output.strip():
        from smd_cli.core.outputs import check_template

        try:
            check_template(s.output)
        except Exception as exc:  # OutputError: relocate it onto the scene key
            problems.append(sf.error(("output",), str(exc)))
    return problems


def load_scene(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> SceneFile:
    """Read, parse and validate a scene file; `overrides` are `key.path=value` settings applied on top."""
    from smd_cli.core.files import MAX_SCENE_BYTES, UnreadableFile, read_bytes

    path = Path(path)
    try:
        text = read_bytes(path, MAX_SCENE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise SceneError("scene file not found", file=path) from None
    except UnreadableFile as exc:
        raise SceneError(f"cannot read the scene file: it is {exc}", file=path) from None
    except UnicodeDecodeError as exc:
        raise SceneError(f"cannot read the scene file: not UTF-8 text ({exc.reason} at byte {exc.start})",
                         file=path) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise SceneError(f"cannot read the scene file: {getattr(exc, 'strerror', None) or exc}", file=path) from None
    data, lines = _index_lines(text, path)
    overridden = _apply_overrides(data, overrides, path)
    return validate_scene(data, path=path, lines=lines, overridden=overridden)


def scene_from_prompt(prompt: str, negative_prompt: str = "",
                      overrides: list[str] | dict[str, Any] | None = None, name: str = "prompt") -> SceneFile:
    """A one-layer scene without masks: plain text-to-image sampling (or a panorama on a wide canvas)."""
    data: dict[str, Any] = {"layers": [{"name": name, "prompt": prompt, "negative_prompt": negative_prompt}]}
    overridden = _apply_overrides(data, overrides, None)
    sf = validate_scene(data, overridden=overridden)
    sf.label = name
    return sf


def _apply_overrides(data: dict, overrides, path: Path | None) -> set[KeyPath]:
    if not overrides:
        return set()
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    done: set[KeyPath] = set()
    for key, value in items:
        key = tuple(parse_override(f"{key}=")[0]) if isinstance(key, str) else tuple(key)
        if key == ("steps",):
            data.pop("timesteps", None)  # a step count on the command line replaces a listed schedule
        apply_override(data, key, value, path)
        done.add(key)
    return done


def step_count(scene: Scene) -> int:
    """How many steps a scene will take."""
    if scene.timesteps is not None:
        return len(scene.timesteps)
    return scene.steps or defaults.STEPS[scene.scheduler]


def hires_steps(scene: Scene) -> tuple[int, int]:
    """The steps of a scene's first pass, and of its hires pass (0 without one): the last
    `int(steps * strength)` of the hires schedule (docs/large-pictures.md)."""
    from smd_cli.method.hires import kept_steps

    first = step_count(scene)
    h = scene.hires
    return first, 0 if h is None else kept_steps(h.steps or first, h.strength)


def mask_file(mask: Any) -> str | None:
    """The image a mask reads (an image mask's or a palette's), as written in the scene."""
    if isinstance(mask, ImageMask):
        return mask.image
    if isinstance(mask, PaletteMask):
        return mask.palette
    return None


def scene_files(sf: SceneFile) -> dict[KeyPath, Path]:
    """Every file a scene reads, in scene order, by the key that names it (`layers[i].mask` for a
    mask image or palette, `background.image`), as absolute paths."""
    files: dict[KeyPath, Path] = {}
    for i, layer in enumerate(sf.scene.layers):
        source = mask_file(layer.mask)
        if source is not None:
            files[("layers", i, "mask")] = sf.resolve(source).absolute()
    if sf.scene.background.image is not None:
        files[("background", "image")] = sf.resolve(sf.scene.background.image).absolute()
    return files


def lora_files(sf: SceneFile) -> dict[KeyPath, Path]:
    """The scene's LoRAs and embeddings that are files or folders on this machine, by key, as
    absolute paths (a hub id is none)."""
    from smd_cli.core.files import exists

    named = [*scene_loras(sf), *((("embeddings", i), e) for i, e in enumerate(sf.scene.embeddings))]
    return {key: sf.resolve(spec.path).absolute() for key, spec in named if exists(sf.resolve(spec.path))}


def scene_controlnets(sf: SceneFile) -> list[tuple[KeyPath, ControlNetSpec]]:
    """Every ControlNet a scene names, the canvas's first, by its key (`controlnet[0]`,
    `layers[1].controlnet[0]`)."""
    out: list[tuple[KeyPath, ControlNetSpec]] = [(("controlnet", i), c) for i, c in enumerate(sf.scene.controlnet)]
    for n, layer in enumerate(sf.scene.layers):
        out += [(("layers", n, "controlnet", i), c) for i, c in enumerate(layer.controlnet)]
    return out


def scene_references(sf: SceneFile) -> list[tuple[KeyPath, ReferenceImage]]:
    """Every reference image a scene names, the canvas's first, by its key (`reference`,
    `layers[1].reference`)."""
    out: list[tuple[KeyPath, ReferenceImage]] = [(("reference",), sf.scene.reference)] if sf.scene.reference else []
    return out + [(("layers", n, "reference"), layer.reference) for n, layer in enumerate(sf.scene.layers)
                  if layer.reference is not None]


def control_files(sf: SceneFile) -> dict[KeyPath, Path]:
    """The images of the scene's ControlNets and reference images, by key, as absolute paths."""
    return {key: sf.resolve(spec.image).absolute() for key, spec in [*scene_controlnets(sf), *scene_references(sf)]}


def scene_loras(sf: SceneFile) -> list[tuple[KeyPath, LoraSpec]]:
    """Every LoRA a scene names, the canvas's first, by its key (`loras[0]`, `layers[1].loras[0]`)."""
    out: list[tuple[KeyPath, LoraSpec]] = [(("loras", i), lora) for i, lora in enumerate(sf.scene.loras)]
    for n, layer in enumerate(sf.scene.layers):
        out += [(("layers", n, "loras", i), lora) for i, lora in enumerate(layer.loras)]
    return out


def merge_overrides(items: list) -> dict[KeyPath, Any]:
    """Command-line values as one ordered override mapping: `key.path=value` strings (--set) and
    (key, value) pairs from options such as --seed; a later one wins."""
    pairs: dict[KeyPath, Any] = {}
    for item in items:
        if isinstance(item, str):
            key, value = parse_override(item)
        else:
            key, value = (item[0] if isinstance(item[0], tuple) else (item[0],)), item[1]
        pairs[key] = value
    return pairs
