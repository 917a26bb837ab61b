"""Batches: the images a command makes (scenes x seeds), planned and checked before any model loads,
then made one after another with each model loaded once. A failing image is recorded and the
batch goes on. Progress and messages go to an `on_event` callback, so that the CLI only prints
and a Python caller can do as it likes:

    from smd_cli.app import batch

    options = batch.Options(seeds=[1, 2, 3], output="out/")
    plan = batch.plan(["scenes/village.yaml", "scenes/sunset-lake.yaml"], options)
    outcomes = batch.run(plan, options, on_event=print)
    batch.exit_code(outcomes)   # 0: all made, 1: some failed, 2: none could start

A sweep (`Options(sweep=sweeps.Sweep.parse(["layers[0].mask_std=0:16:8"]))`, `smd_cli.app.sweeps`)
makes each scene once per combination of its values, with the same seeds: more jobs in one plan.

No torch at import.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

from smd_cli.app.distributed import Shard
from smd_cli.app.sweeps import SweepError
from smd_cli.core import defaults
from smd_cli.core.errors import SignalsHeld, SmdError, unexpected

if TYPE_CHECKING:
    import torch

    from smd_cli.app.records import Record
    from smd_cli.app.sweeps import Sweep, Variant
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline
    from smd_cli.method.views import Tiling
    from smd_cli.scenes.canvas import SceneMasks
    from smd_cli.scenes.scene import SceneFile

MAX_SEEDS = 100_000

# Job statuses: done, failed (during generation), invalid (never started: the scene or its files
# are wrong), interrupted (Ctrl-C during it), skipped (not reached before Ctrl-C).
DONE, FAILED, INVALID, INTERRUPTED, SKIPPED = "done", "failed", "invalid", "interrupted", "skipped"


# ---------------------------------------------------------------------------------------------
# What a batch is asked for, and what it reports


@dataclass
class Options:
    """What a batch is asked for: the model, where outputs go, which seeds, and the fast paths."""

    model: Optional[str] = None  # instead of each scene's own
    config: Optional[str] = None
    output: Optional[str] = None  # a file, folder or template; default: each scene's `output`
    device: Optional[str] = None  # default: SMD_DEVICE, the user config file's, else auto
    dtype: Optional[str] = None  # default: SMD_DTYPE, the user config file's, else auto
    lcm_lora: Optional[str] = None
    vae: Optional[str] = None
    max_batch: Optional[int] = None
    overrides: dict = field(default_factory=dict)  # scene key path -> value, for every scene
    seeds: Optional[list[int]] = None  # one image per seed
    repeat: Optional[int] = None  # or this many random seeds
    overwrite: bool = False
    compile: bool = False
    channels_last: bool = False
    contiguous_vae: bool = False  # as smd 0.2 decoded on a CPU: to reproduce its images bit for bit
    threads: Optional[int] = None  # torch's CPU threads (default: torch's own choice)
    offload: bool = False  # weights in CPU memory, each model on the GPU while it runs
    allow_large: bool = False  # run work past defaults.LARGE_WORK denoiser passes an image (never past MAX_WORK)
    sweep: Optional[Sweep] = None  # each scene once per combination of values (`smd_cli.app.sweeps`)
    yes: bool = False  # make a batch of more than MANY_IMAGES images
    upscale: Optional[str] = None  # `smd upscale`: the image whose hires pass each scene runs

    def __post_init__(self):
        from smd_cli.app.user_config import user_default

        self.device = self.device or user_default("device") or "auto"
        self.dtype = self.dtype or user_default("dtype") or "auto"


@dataclass
class Message:
    """Something to tell: `info` (progress notes), `detail` (for --verbose), `unchecked` (a check
    that must wait until the model loads) or `error`."""

    level: str
    text: str


@dataclass
class Loading:
    """A model starts loading."""

    model: str
    device: str
    dtype: str


@dataclass
class Loaded:
    """A model finished loading (its description), or failed to (None)."""

    description: Optional[str]
    seconds: float


@dataclass
class Progress:
    """Image `image` of this process's `images` is `step` of `steps` steps done (0 when it starts)."""

    job: Job
    step: int
    steps: int
    image: int = 1
    images: int = 1


@dataclass
class Finished:
    """An image is done, or failed (with the traceback of an unexpected failure)."""

    outcome: Outcome
    traceback: Optional[str] = None


Event = Union[Message, Loading, Loaded, Progress, Finished]
OnEvent = Callable[[Event], None]


def _ignore(event: Event) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Seeds, jobs and outcomes


def parse_seeds(text: str) -> list[int]:
    """`1,2,3`, `10-20` (inclusive) or a mix like `1,5-7`; duplicates are dropped, order kept."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise SmdError(f"--seeds expects numbers and ranges like 1,2,3 or 10-20, got {part!r} in {text!r}")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise SmdError(f"--seeds range {part} runs backwards; write {last}-{first}")
        if last >= defaults.SEED_LIMIT:
            raise SmdError(f"--seeds {last} is too large; seeds are below 2**63")
        if last - first + 1 + len(seeds) > MAX_SEEDS:
            raise SmdError(f"--seeds {text!r} asks for more than {MAX_SEEDS} images")
        seeds.extend(range(first, last + 1))
    return list(dict.fromkeys(seeds))


@dataclass
class Job:
    """One image to make: a scene with its seed filled in, its prepared masks, where it goes."""

    index: int
    scene: SceneFile
    seed: int
    template: str
    sources: Sources
    masks: Optional[SceneMasks] = None
    random_seed: bool = False  # the seed was drawn, not given
    variant: Optional[Variant] = None  # its values in a sweep
    passes: int = 0  # denoiser passes: views x layers x steps
    estimate: float = 0.0  # seconds, roughly (`pass_seconds`)

    def outcome(self, status: str, **details) -> Outcome:
        """What became of this job."""
        return Outcome(scene=self.scene.name, file=str(self.scene.path) if self.scene.path else None,
                       seed=self.seed, index=self.index, status=status,
                       vary=dict(self.variant.labels) if self.variant else None, **details)

    def path(self, when: datetime | None = None) -> Path:
        """Where the image goes: the template filled in."""
        from smd_cli.core.outputs import output_path
        from smd_cli.scenes.scene import step_count

        return output_path(self.template, scene=self.scene.name, seed=self.seed,
                           steps=step_count(self.scene.scene), index=self.index, when=when,
                           vary=self.variant.name if self.variant else "")


@dataclass
class Outcome:
    """What became of one job (or of a scene that never made it to a job)."""

    scene: str
    file: Optional[str]
    seed: Optional[int]
    status: str
    path: Optional[str] = None
    seconds: float = 0.0
    error: Optional[str] = None
    index: Optional[int] = None
    more_errors: list[str] = field(default_factory=list)  # a scene's other problems, in file order
    vary: Optional[dict[str, str]] = None  # a sweep's values: key -> value as printed

    def as_json(self) -> dict[str, Any]:
        out = {"scene": self.scene, "file": self.file, "seed": self.seed, "path": self.path,
               "seconds": round(self.seconds, 3), "status": self.status}
        if self.vary is not None:
            out["vary"] = self.vary
        if self.error is not None:
            out["error"] = self.error
        if self.more_errors:
            out["more_errors"] = self.more_errors
        return out


def seeds_for(sf: SceneFile, seeds: list[int] | None, repeat: int | None) -> list[tuple[int, bool]]:
    """(seed, drawn) for each image of a scene: --seeds, else --repeat random ones, else the scene's."""
    from smd_cli.scenes.scene import random_seed

    if seeds:
        return [(s, False) for s in seeds]
    if repeat:
        return [(random_seed(), True) for _ in range(repeat)]
    if sf.scene.seed is not None:
        return [(sf.scene.seed, False)]
    return [(random_seed(), True)]


def with_seed(sf: SceneFile, seed: int) -> SceneFile:
    """The same scene file with its seed set."""
    return dataclasses.replace(sf, scene=sf.scene.model_copy(update={"seed": seed}))


def output_template(sf: SceneFile, output: str | None) -> str:
    """Where a scene's images go: `output` (checked), else the scene's `output`, else the default."""
    from smd_cli.core.outputs import DEFAULT_TEMPLATE, check_template, names_folder

    if output is not None:
        check_template(output)
        return output
    if sf.scene.output is not None:
        folder = names_folder(sf.scene.output)  # a folder to be made: keep saying so
        return str(sf.resolve(sf.scene.output)) + (os.sep if folder else "")
    return DEFAULT_TEMPLATE


def reproducing(record: Record, source: Path, output: str | None = None, *, model: str | None = None,
                config: str | None = None, device: str | None = None, dtype: str | None = None,
                **options) -> tuple[SceneFile, Options]:
    """The scene and options to make the image at `source` again from its `record`: with the
    recorded seed, on the recorded kind of device (cuda:1 ran there, cuda runs here), in the
    recorded dtype, with the recorded configs, unless told otherwise. The new image goes beside the
    source by default, never onto it."""
    sf = with_seed(record.scene_file(), record.seed)  # its files' hashes are checked as they are read
    output = output if output is not None else str(source.with_name(f"{source.stem}-reproduced.png"))
    chosen = Options(model=model, config=config or record.config, output=output,
                     device=device or (record.device or "auto").split(":")[0], dtype=dtype or record.dtype or "auto",
                     contiguous_vae=record.before_0_3, **options)
    if Job(0, sf, record.seed, output_template(sf, output), sources_of(sf, chosen)).path().resolve() == \
            Path(source).resolve():
        raise SmdError(f"--out {output} is the image being reproduced; the new image must go elsewhere")
    return sf, chosen


def reads(sf: SceneFile, options: Options) -> list[str]:
    """Every file on this machine that making `sf` would read: its masks, background image and LoRAs, and
    the model, LCM LoRA, autoencoder and config where they are local paths."""
    from smd_cli.core.files import exists, expand_user
    from smd_cli.scenes.scene import control_files, lora_files, scene_controlnets, scene_files, scene_references

    sources = sources_of(sf, options)
    local = [x for x in (sources.model, sources.lcm_lora, sources.vae, options.config) if x and exists(x)]
    local += [sf.source(spec.model) for _, spec in scene_controlnets(sf) if exists(sf.source(spec.model))]
    local += [sf.source(spec.adapter) for _, spec in scene_references(sf)
              if spec.adapter and exists(sf.source(spec.adapter))]
    return ([str(path) for path in (*scene_files(sf).values(), *lora_files(sf).values(), *control_files(sf).values())]
            + [str(expand_user(x).absolute()) for x in local])


@dataclass(frozen=True)
class Sources:
    """What a scene runs on: the model, its LCM LoRA and autoencoder."""

    model: Optional[str]  # None: smd's own default
    lcm_lora: str
    vae: Optional[str]  # None: the model's own

    def as_key(self) -> tuple:
        return (self.model, self.lcm_lora, self.vae)


def with_preset(sf: SceneFile, options: Options) -> SceneFile:
    """The scene with the model preset the run chooses (`smd_cli.scenes.presets`) expanded into it."""
    from smd_cli.app.user_config import user_default
    from smd_cli.scenes.presets import expand

    return expand(sf, options.model or sf.scene.model or user_default("model"))


def sources_of(sf: SceneFile, options: Options) -> Sources:
    """Each of a scene's sources in one order: the batch's setting, else the scene's (a path relative
    to the scene file where one exists there), else your default (SMD_MODEL, SMD_LCM_LORA or the
    config file's); the LCM LoRA is `auto` by default. A preset's name stands for its hub id."""
    from smd_cli.app.user_config import user_default
    from smd_cli.scenes.presets import model_of

    return Sources(model=model_of(options.model or sf.source(sf.scene.model) or user_default("model")),
                   lcm_lora=options.lcm_lora or sf.source(sf.scene.lcm_lora) or user_default("lcm_lora") or "auto",
                   vae=options.vae or sf.source(sf.scene.vae))


def plan_exit_code(plan: Plan) -> int:
    """What a plan alone (a dry run) exits with: 0 if every scene can start, 2 if none can, else 1."""
    return 2 if not plan.jobs else 1 if plan.invalid else 0


def exit_code(outcomes: list[Outcome]) -> int:
    """0 if every image was made, 2 if none could start (bad input everywhere), else 1."""
    if outcomes and all(o.status == DONE for o in outcomes):
        return 0
    if all(o.status == INVALID for o in outcomes):
        return 2
    return 1


def tally(outcomes: list[Outcome]) -> str:
    """Counts by status, for the last line of a summary: `2 done, 1 failed`."""
    order = (DONE, FAILED, INVALID, INTERRUPTED, SKIPPED)
    counts = {status: sum(o.status == status for o in outcomes) for status in order}
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n)


# ---------------------------------------------------------------------------------------------
# Planning: everything checked before any model loads


@dataclass
class Plan:
    """The images of a batch, the scenes that cannot start, and where the images will be made."""

    jobs: list[Job]
    invalid: list[Outcome]
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    shard: Shard = field(default_factory=Shard)

    def rows(self, options: Options) -> list[dict[str, Any]]:
        """What each image will be, for a dry run."""
        from smd_cli.scenes.scene import step_count

        return [{"scene": job.scene.name, "file": str(job.scene.path) if job.scene.path else None, "seed": job.seed,
                 "width": job.masks.width, "height": job.masks.height, "layers": len(job.scene.scene.layers),
                 "steps": step_count(job.scene.scene), "model": job.sources.model or defaults.MODEL,
                 "path": str(job.path()), "status": "planned", "passes": job.passes,
                 "estimate": round(job.estimate, 3), **({"vary": job.variant.labels} if job.variant else {})}
                for job in self.jobs]

    def estimate(self) -> tuple[int, float]:
        """Denoiser passes in all, and roughly how many seconds they take (`pass_seconds`)."""
        return sum(job.passes for job in self.jobs), sum(job.estimate for job in self.jobs)


def plan(items: Iterable[Union[str, Path, SceneFile]], options: Options, *,
         check: Callable[[SceneFile], None] | None = None, shard: Shard | None = None,
         on_event: OnEvent | None = None) -> Plan:
    """Every image to make (scenes x seeds) as a `Job`, each checked before any model loads: the
    scene and its files; the model, LCM LoRA and autoencoder, and the steps against the model's
    schedule; the canvas against the model's downscale factor and the device's free memory; the
    output names and folders. A scene that fails any of these is an `invalid` outcome with all its
    problems, and the others go on; `check(scene)` adds a command's own rule.

    `items` are scene paths (read here, so that a broken one fails alone) or `SceneFile`s.
    Raises `SmdError` for what stops the whole batch (a missing --model, a bad device).
    """
    from smd_cli.engine.memory import available_memory
    from smd_cli.models.loading import check_source, resolve_device, resolve_dtype

    shard = shard or Shard()
    emit = on_event or _ignore
    if options.model:
        from smd_cli.scenes.presets import model_of

        check_source(model_of(options.model))
    device = shard.state.device if shard.state is not None and options.device == "auto" \
        else resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    free = shard.least(available_memory(device))  # the same in every process, so all plan the same
    now = datetime.now()
    jobs: list[Job] = []
    invalid: list[Outcome] = []
    items = list(items)
    _check_sweep(options, len(items))
    emit = _once(emit)  # a sweep plans a scene many times: each note is said once
    for item in items:
        try:
            made = _plan_scene(item, options, check, device, dtype, free, len(jobs), now, emit)
        except SweepError:  # a value the sweep gives is wrong: every scene would say so, and none should run
            raise
        except Exception as exc:  # smd's own errors, and any other: the scene fails alone
            path = Path(item) if isinstance(item, (str, Path)) else None
            errors = exc.messages() if isinstance(exc, SmdError) else [unexpected(exc)]
            if not isinstance(exc, SmdError):
                emit(Message("detail", traceback.format_exc()))
            invalid.append(Outcome(scene=path.stem if path else item.name, file=str(path) if path else None,
                                   seed=None, status=INVALID, error=errors[0], more_errors=errors[1:]))
            continue
        jobs.extend(made)
    check_count(len(jobs), options)
    seeds = shard.same([job.seed for job in jobs])  # seeds drawn at random must be the same in every process
    for job, seed in zip(jobs, seeds):
        job.seed, job.scene = seed, with_seed(job.scene, seed)
    _check_distinct_outputs(jobs, options)
    return Plan(jobs, invalid, device, dtype, shard)


def _plan_scene(item, options: Options, check, device, dtype, free: int | None, first: int, now: datetime,
                emit: OnEvent) -> list[Job]:
    """The jobs of one scene, every check passed. The checks that do not depend on each other (the
    model and its schedule; the canvas, masks and memory; the outputs) all run, and every problem
    they find is raised at once, in file order."""
    from smd_cli.scenes.scene import load_scene

    sf = load_scene(item, options.overrides) if isinstance(item, (str, Path)) else item
    if not options.sweep:
        return _plan_variant(sf, None, None, options, check, device, dtype, free, first, now, emit)
    # One draw of seeds for all the variants, so that they differ only in what the sweep varies.
    varies_seed = any(axis.key == ("seed",) for axis in options.sweep.axes)
    seeds = None if varies_seed else seeds_for(sf, options.seeds, options.repeat)
    made: list[Job] = []
    for variant in options.sweep.variants():
        made += _plan_variant(variant_scene(item, sf, options, variant), variant, seeds, options, check, device,
                              dtype, free, first + len(made), now, emit)
    return made


def _plan_variant(sf: SceneFile, variant: Variant | None, seeds: list[tuple[int, bool]] | None, options: Options,
                  check, device, dtype, free: int | None, first: int, now: datetime, emit: OnEvent) -> list[Job]:
    """The jobs of one scene (one variant of it in a sweep), as `_plan_scene` says."""
    from smd_cli.core.errors import SceneError
    from smd_cli.scenes.scene import step_count

    sf = with_preset(sf, options)
    if check is not None:
        check(sf)
    problems: list[SceneError] = []

    def attempt(step, *args):
        try:
            return step(*args)
        except SceneError as exc:
            problems.extend([exc, *exc.others])
        except SmdError as exc:  # a model or an output: said with the scene it belongs to
            problems.append(SceneError(str(exc), file=sf.path))

    sources = sources_of(sf, options)  # once: the checks and the jobs see the same
    for note in attempt(_check_sources, sf, options, sources) or []:
        emit(Message("unchecked", f"{sf.name}: {note}"))
    masks, views = attempt(_scene_masks, sf, options, sources, device, dtype, free, emit) or (None, None)
    made = attempt(_scene_jobs, sf, options, sources, masks, first, now, variant, seeds)
    if problems:
        raise SceneError.gather(problems)
    passes = views.count * len(sf.scene.layers) * step_count(sf.scene)
    seconds = passes * pass_seconds(device, sources, options, views)
    for job in made:
        job.passes, job.estimate = passes, seconds
    drawn = [job.seed for job in made if job.random_seed]
    if options.repeat and drawn:
        emit(Message("detail", f"{sf.name}: random seeds {', '.join(map(str, drawn))}"))
    emit(Message("detail", f"{sf.name}: {masks.width}x{masks.height}, {len(sf.scene.layers)} layer(s), "
                           f"{step_count(sf.scene)} {sf.scene.scheduler} steps"))
    return made


def _scene_masks(sf: SceneFile, options: Options, sources: Sources, device, dtype, free: int | None,
                 emit: OnEvent) -> tuple[SceneMasks, Tiling]:
    """The canvas and its views (against the model's family), the work they ask for, the masks and the
    memory needed."""
    from smd_cli.engine.memory import check_memory
    from smd_cli.scenes.canvas import canvas_views, model_canvas
    from smd_cli.scenes.presets import model_grid

    masks, factor = model_canvas(sf, sources.model, options.config, allow_large=options.allow_large)
    width, height = masks.width, masks.height
    views = canvas_views(sf, model_grid(sources.model, options.config), width, height)
    _check_views(sf, views)
    emit(Message("detail", check_memory(sf, sources.model, width=width, height=height, factor=factor,
                                        device=device, dtype=dtype, free=free, max_batch=options.max_batch,
                                        vae=sources.vae, offload=options.offload, views=views)))
    return masks, views


def _scene_jobs(sf: SceneFile, options: Options, sources: Sources, masks: SceneMasks | None, first: int,
                now: datetime, variant: Variant | None = None,
                seeds: list[tuple[int, bool]] | None = None) -> list[Job]:
    """One job per seed (`seeds`, else the scene's and the options'), each output name and folder checked."""
    from smd_cli.core.outputs import check_writable, with_vary

    template = output_template(sf, options.output)
    if variant is not None:
        template = with_vary(template)  # the images of a sweep are named apart
    seeds = seeds if seeds is not None else seeds_for(sf, options.seeds, options.repeat)
    made = [Job(first + n, with_seed(sf, seed), seed, template, sources, masks, drawn, variant)
            for n, (seed, drawn) in enumerate(seeds)]
    for job in made:
        check_writable(job.path(now))
    return made


def check_controls(sf: SceneFile) -> tuple[list[str], list[SmdError]]:
    """Whether each LoRA, ControlNet, embedding and IP-Adapter the scene names can be had (a local path that exists,
    a hub id cached when offline): notes on what is checked when it loads, and the errors, each at its key."""
    from smd_cli.models.loading import _looks_like_path, check_available, hub_file
    from smd_cli.scenes.scene import scene_controlnets, scene_loras, scene_references

    wanted = [(key, spec.path, "LoRA") for key, spec in scene_loras(sf)]
    wanted += [(key + ("model",), spec.model, "ControlNet") for key, spec in scene_controlnets(sf)]
    wanted += [(("embeddings", i), spec.path, "embedding") for i, spec in enumerate(sf.scene.embeddings)]
    wanted += [(key + ("adapter",), spec.adapter, "IP-Adapter") for key, spec in scene_references(sf) if spec.adapter]
    notes, problems = [], []
    for key, name, what in wanted:
        source = sf.source(name)
        if hub_file(source) is None and _looks_like_path(source):  # named in errors as the scene means it
            source = str(sf.resolve(source))
        try:
            notes.append(check_available(source, what))
        except SmdError as exc:
            problems.append(sf.error(key, str(exc)))
    return notes, problems


def _check_sources(sf: SceneFile, options: Options, sources: Sources) -> list[str]:
    """The model, LCM LoRA and autoencoder exist (local paths; hub ids in the cache when offline),
    and the steps fit the model's schedule. Returns what cannot be checked before loading."""
    from smd_cli.core.errors import SceneError
    from smd_cli.families import DEFAULT, FAMILIES, named
    from smd_cli.models.loading import (
        check_available,
        chosen_lcm_lora,
        config_json,
        denoiser_config,
        model_family,
        vae_source,
    )

    model = sources.model or defaults.MODEL
    unet = denoiser_config(model) or (denoiser_config(None, options.config) if options.config else None)
    family = "sd" if model == defaults.MODEL else model_family(model, options.config)  # None: not known yet
    lora = sources.lcm_lora  # `auto` stays undecided for a model whose UNet config is not here yet
    if unet is not None:
        lora = chosen_lcm_lora(lora, unet)
    elif lora == "none":
        lora = None
    elif lora == "auto" and model == defaults.MODEL:  # the default model takes the default LoRA
        lora = DEFAULT.lcm_lora
    vae = sources.vae
    if vae is not None and (vae != "tiny" or family is not None):
        vae = vae_source(vae, family or "sd")
    notes, problems = [], []
    for name, what in ((model, "model"), (lora, "LCM LoRA"), (vae, "VAE")):
        if name in ("auto", "tiny"):  # which LoRA or tiny autoencoder fits is known when the model loads
            choices = {f.name: f.lcm_lora if name == "auto" else f.tiny_vae for f in FAMILIES.values()}
            choices = {k: v for k, v in choices.items() if v}
            wanted = choices.get(family, "") if family else " or ".join(dict.fromkeys(choices.values()))
            if wanted and not all(_available(c, what) for c in ([wanted] if family else choices.values())):
                notes.append(f"the model may need the {what} {wanted}, which is not downloaded")
            continue
        try:
            notes.append(check_available(name, what))
        except SmdError as exc:  # every missing download is named, not only the first
            problems.append(SceneError(str(exc), file=sf.path))
    more_notes, more_problems = check_controls(sf)
    notes, problems = notes + more_notes, problems + more_problems
    schedule = config_json(model, "scheduler/scheduler_config.json")
    if schedule is None:
        notes.append("its steps are checked against the model's schedule when the model loads")
    else:
        s = sf.scene
        try:
            named(family or "sd").schedule_for(s.scheduler, schedule, s.steps, s.timesteps, s.timestep_spacing)
        except SceneError as exc:
            problems.append(exc)
        except SmdError as exc:
            problems.append(sf.error(("timesteps",) if s.timesteps else ("steps",), str(exc)))
    if problems:
        raise SceneError.gather(problems)
    return [note for note in notes if note]


def _available(name: str, what: str) -> bool:
    from smd_cli.models.loading import check_available

    try:
        check_available(name, what)
    except SmdError:
        return False
    return True


# Past this many views per layer and step (a tiny tile_stride), a scene is surely a mistake; past
# defaults.LARGE_WORK denoiser passes in all it is refused (`canvas.check_work`).
MANY_VIEWS = 256
# Past this many images a batch is surely a mistake: a --repeat or --seeds range is warned about,
# a --vary sweep (whose count multiplies unseen) refused unless the command says --yes. Each image's
# work is bounded (`canvas.check_work`); their number is the command line's, never a scene file's.
MANY_IMAGES = 1000


def check_count(images: int, options: Options, how: str = "") -> None:
    """Past MANY_IMAGES images: a warning for seeds, a refusal for a sweep unless `options.yes` (the
    one home of the limit)."""
    if images <= MANY_IMAGES or options.yes:
        return
    if not options.sweep:
        warnings.warn(f"this batch makes {images} images", stacklevel=3)
    else:
        raise SmdError(f"this batch makes {images:,} images{how}, more than {MANY_IMAGES:,}; give --yes "
                       "(Options(yes=True)) to make them all")


def _check_sweep(options: Options, scenes: int) -> None:
    """A sweep's own rules, before any scene is read: seeds given once, and the count of images."""
    sweep = options.sweep
    seeds = len(options.seeds) if options.seeds else options.repeat or 1
    if sweep and any(axis.key == ("seed",) for axis in sweep.axes) and (options.seeds or options.repeat):
        raise SweepError("give the seeds with --vary seed=... or with --seeds/--repeat, not both")
    if sweep:
        check_count(scenes * sweep.size * seeds, options,
                    f" ({scenes} scene(s) x {sweep.size} combinations x {seeds} seed(s))")


def variant_scene(item: Union[str, Path, SceneFile], sf: SceneFile, options: Options, variant: Variant) -> SceneFile:
    """The scene with a sweep's values set, as `--set` sets them: a scene file is read again with
    them after the options' overrides; a scene given as a `SceneFile` gets them on its keys."""
    from smd_cli.core.errors import SceneError
    from smd_cli.scenes.scene import _apply_overrides as apply_overrides
    from smd_cli.scenes.scene import load_scene, merge_overrides, validate_scene

    try:
        if isinstance(item, (str, Path)):
            given = options.overrides
            given = merge_overrides(list(given)) if isinstance(given, list) else dict(given or {})
            return load_scene(item, {**given, **variant.overrides})
        data = sf.scene.model_dump(mode="json", exclude_unset=True)
        overridden = apply_overrides(data, variant.overrides, sf.path)
        made = validate_scene(data, path=sf.path, lines=sf.lines, overridden=sf.overridden | overridden)
        made.label = sf.label
        return made
    except SceneError as exc:
        raise SweepError(_sweep_problem(exc, variant)) from None


def _sweep_problem(exc: SmdError, variant: Variant) -> str:
    """A scene's complaint about a sweep's values, said as the `--vary` that gave them."""
    from smd_cli.app.sweeps import describe

    where = f"{exc.file}: " if getattr(exc, "file", None) else ""
    message = getattr(exc, "message", str(exc)).removesuffix(" (set on the command line)")
    message = re.sub(r"^--set [^:]*: ", "", message)
    key = getattr(exc, "key", None)
    if key in variant.labels:
        return f"{where}--vary {key}={variant.labels[key]}: {message}"
    return f"{where}--vary {describe(variant)}: {f'{key}: ' if key else ''}{message}"


# Rough seconds of one denoiser pass of a 64 x 64-latent view (SD 1.5 at 512 px) by kind of device, for a
# dry run's estimate: SD 1.5-sized UNets in float16 on a recent CUDA GPU, in float32 on a few CPU cores.
# Scaled by the view's latent pixels and the family's weights; loading and decoding are not counted.
PASS_SECONDS = {"cuda": 0.02, "mps": 0.15, "cpu": 1.0}


def pass_seconds(device, sources: Sources, options: Options, views: Tiling) -> float:
    """Roughly how long one denoiser pass of these views takes on `device` (a figure to plan by)."""
    from smd_cli.families import DEFAULT, named
    from smd_cli.models.loading import model_family

    family = named(model_family(sources.model or defaults.MODEL, options.config) or DEFAULT.name)
    pixels = views.view[0] * views.view[1] / (64 * 64)
    return PASS_SECONDS.get(getattr(device, "type", str(device)), PASS_SECONDS["cpu"]) * pixels * \
        family.weight_bytes / DEFAULT.weight_bytes


def _once(emit: OnEvent) -> OnEvent:
    """`emit`, saying each message only once."""
    said: set = set()

    def once(event: Event) -> None:
        if isinstance(event, Message):
            if (event.level, event.text) in said:
                return
            said.add((event.level, event.text))
        emit(event)

    return once


def _check_views(sf: SceneFile, views: Tiling) -> None:
    """Warn, with the count, when a scene's tiling makes absurdly many views."""
    s = sf.scene
    count = views.count
    if count > MANY_VIEWS:
        warnings.warn(f"{sf.name}: {count} views per layer and step (tile_size {s.tile_size}, tile_stride "
                      f"{s.tile_stride}): this takes {count} times as long as one view", stacklevel=2)


def _check_distinct_outputs(jobs: list[Job], options: Options) -> None:
    """Images of one batch must not share a file where one would replace another: with an explicit
    output, or with `overwrite`. (Otherwise a clash is numbered -1, -2, ... like any existing file.)"""
    if len(jobs) < 2 or (options.output is None and not options.overwrite):
        return
    now = datetime.now()
    paths = [job.path(now).absolute() for job in jobs]
    if len(set(paths)) == len(paths):
        return
    scenes = len({job.scene.name for job in jobs})
    what = f"{len(jobs)} images" if scenes == 1 else f"{scenes} scenes" if scenes == len(jobs) else \
        f"{len(jobs)} images of {scenes} scenes"
    if options.output is not None:
        fields = "{scene}, {seed}, {vary} or {index}" if options.sweep else "{scene}, {seed} or {index}"
        raise SmdError(f"--out {options.output} names one file for {what}; give a folder, or a template with "
                       f"{fields}")
    clash = next(p for p in paths if paths.count(p) > 1)
    raise SmdError(f"with --overwrite, images would replace each other in {clash}; give --out with {{scene}}, "
                   "{seed} or {index}, or leave out --overwrite to number them")


# ---------------------------------------------------------------------------------------------
# Running


class ModelCache:
    """One loaded pipeline per distinct (model, LCM LoRA, autoencoder), loaded on first use; the
    previous one is freed first. A model that failed to load fails again at once."""

    def __init__(self, options: Options, device: torch.device, dtype: torch.dtype, on_event: OnEvent | None = None):
        self.options, self.device, self.dtype = options, device, dtype
        self.emit = on_event or _ignore
        self.loaded: dict[tuple, Any] = {}
        self.seconds = 0.0  # spent loading so far

    def get(self, sources: Sources) -> StableMultiDiffusionPipeline:
        key = sources.as_key()
        if key not in self.loaded:
            self.loaded.clear()  # free the previous model before loading another
            self.loaded[key] = self._load(*key)
        if isinstance(self.loaded[key], SmdError):
            raise self.loaded[key]
        return self.loaded[key]

    def _load(self, model: str | None, lcm_lora: str, vae: str | None) -> Any:
        import torch

        from smd_cli.engine.pipeline import StableMultiDiffusionPipeline
        from smd_cli.models.loading import dtype_name

        started = time.perf_counter()
        self.emit(Loading(model or defaults.MODEL, str(self.device), dtype_name(self.dtype)))
        try:
            pipe = StableMultiDiffusionPipeline(self.device, hf_key=model, dtype=self.dtype, lcm_lora=lcm_lora,
                                                config=self.options.config, vae=vae, offload=self.options.offload)
            pipe.optimize(channels_last=self.options.channels_last, compile=self.options.compile)
            if self.options.contiguous_vae:
                pipe.vae.to(memory_format=torch.contiguous_format)
        except SmdError as exc:
            self._loaded(started, None)
            return exc
        except BaseException:
            self._loaded(started, None)
            raise
        self._loaded(started, "".join([pipe.components.source] + [f" + {x}" for x in (
            pipe.components.lcm_lora, pipe.components.vae_source) if x]))
        return pipe

    def _loaded(self, started: float, description: str | None) -> None:
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.emit(Loaded(description, seconds))


def load_session_model(options: Options, sources: Sources, on_event: OnEvent | None = None) -> Any:
    """The one pipeline a live session (smd stream, smd paint) keeps, on the options' device and
    dtype; compiling is the stream's own business (its one fixed shape), not the loader's."""
    from smd_cli.models.loading import resolve_device, resolve_dtype, set_threads

    if options.threads:
        set_threads(options.threads)
    device = resolve_device(options.device)
    cache = ModelCache(dataclasses.replace(options, compile=False), device, resolve_dtype(options.dtype, device),
                       on_event)
    return cache.get(sources)


def run(plan: Plan, options: Options, *, on_event: OnEvent | None = None,
        cache: ModelCache | None = None) -> list[Outcome]:
    """Make this process's share of the planned images, one after another; returns every outcome of
    the batch (the scenes that could not start, then the jobs in order, gathered from every process).

    A failing image is reported and the batch goes on. Ctrl-C stops after writing nothing half-way:
    the image in progress is `interrupted`, the rest `skipped`, and the outcomes are not gathered.
    """
    emit = on_event or _ignore
    cache = cache or ModelCache(options, plan.device, plan.dtype, emit)
    shard = plan.shard
    mine = shard.take(plan.jobs)
    if shard.size > 1:
        emit(Message("detail", f"process {shard.rank + 1} of {shard.size}: {len(mine)} of {len(plan.jobs)} images "
                               f"on {plan.device}"))
    if options.threads:
        from smd_cli.models.loading import set_threads

        set_threads(options.threads)
    outcomes: list[Outcome] = []
    for n, job in enumerate(mine):
        started, loading = time.perf_counter(), cache.seconds

        def spent(started: float = started, loading: float = loading) -> float:  # less loading a model
            return time.perf_counter() - started - (cache.seconds - loading)

        position = (n + 1, len(mine))
        try:
            made = _make(job, options, cache, emit, position)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM or SIGHUP (errors.Terminated)
            outcomes.append(job.outcome(INTERRUPTED, seconds=spent()))
            return _interrupted(plan, outcomes, mine[n + 1:], exc, emit)
        except Exception as exc:  # reported as the image's outcome, below
            made = exc
        # A finished image is written and reported whole: a signal now waits until it is.
        with SignalsHeld() as held:
            outcome, trace = _finish(job, made, options, emit, position)
            outcome.seconds = spent()
            emit(Finished(outcome, trace))
            outcomes.append(outcome)
        if held.signum is not None:
            return _interrupted(plan, outcomes, mine[n + 1:], held.interruption(), emit)
    everything = shard.gather((plan.invalid if shard.main else []) + outcomes)
    return sorted(everything, key=lambda o: (o.index is not None, o.index or 0)) if shard.shared else everything


def _interrupted(plan: Plan, outcomes: list[Outcome], later: list[Job], exc: BaseException,
                 emit: OnEvent) -> list[Outcome]:
    """The outcomes of a batch stopped by a signal: the jobs not begun are skipped, none gathered."""
    outcomes += [job.outcome(SKIPPED) for job in later]
    emit(Message("info", f"interrupted by {exc}" if str(exc) else "interrupted"))
    return (plan.invalid if plan.shard.main else []) + outcomes


def _finish(job: Job, made: Any, options: Options, emit: OnEvent,
            position: tuple[int, int]) -> tuple[Outcome, str | None]:
    """The outcome of one image, `made` by `_make`: written with its record, or why it failed."""
    try:
        if isinstance(made, BaseException):
            raise made
        return (made if isinstance(made, Outcome) else _save(job, made, options, emit, position)), None
    except SmdError as exc:
        return job.outcome(FAILED, error=str(exc)), None
    except Exception as exc:  # a bug or a library failure: report it and go on with the batch
        return job.outcome(FAILED, error=unexpected(exc)), traceback.format_exc()


def _make(job: Job, options: Options, cache: ModelCache, emit: OnEvent, position: tuple[int, int]) -> Any:
    """Make one image (number `position[0]` of `position[1]`): its `Result`, or the outcome of a job
    that could not start."""
    from smd_cli.app.requests import generate, upscale
    from smd_cli.scenes.scene import hires_steps

    sf = job.scene
    try:
        pipe = cache.get(job.sources)
        pipe.schedule(sf.scene.steps, sf.scene.timesteps, sf.scene.scheduler, sf.scene.timestep_spacing)
    except SmdError as exc:  # no model, or steps it cannot take: the image never started
        return job.outcome(INVALID, error=str(exc))
    # What the schedule, checked just now, will take: one bar over both passes of a hires scene.
    first, second = hires_steps(sf.scene)
    steps = second if options.upscale is not None else first + second
    emit(Progress(job, 0, steps, *position))
    done = itertools.count(1)  # steps so far, whichever pass they are in
    callback = lambda k, n, x0: emit(Progress(job, next(done), steps, *position))  # noqa: E731
    if options.upscale is not None:
        from smd_cli.core.files import MAX_IMAGE_BYTES, decode_image, read_bytes

        image = decode_image(read_bytes(Path(options.upscale), MAX_IMAGE_BYTES))
        return upscale(pipe, sf, image, masks=job.masks, max_batch=options.max_batch, allow_large=options.allow_large,
                       callback=callback)
    return generate(pipe, sf, masks=job.masks, max_batch=options.max_batch, allow_large=options.allow_large,
                    callback=callback)


def _save(job: Job, result: Any, options: Options, emit: OnEvent, position: tuple[int, int]) -> Outcome:
    """Write a made image with its record, and say so."""
    from smd_cli.scenes.scene import step_count

    sf = job.scene
    steps = step_count(sf.scene)
    path = job.path()
    written = result.save(path, overwrite=options.overwrite)
    if written != path:
        emit(Message("info", f"{path} exists; wrote {written.name} beside it (--overwrite replaces)"))
    seconds = result.timings["generate"]
    emit(Message("info", f"image {position[0]}/{position[1]}: {sf.name}, seed {result.seed}, {seconds:.1f} s "
                         f"({steps / seconds:.2f} steps/s)"))
    emit(Message("detail", f"{sf.name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())))
    return job.outcome(DONE, path=str(written))
