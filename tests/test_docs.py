"""The documentation (README.md and docs/*.md) against the code, both ways.

Code -> docs: every command and every option of every command appears in the docs, every scene key
in docs/keys.md, every setting of the user config file in the docs. Docs -> code: every `smd`
command and option the docs show exists for that command, every YAML scene in the docs passes smd's
own validation, every Python block parses, and every relative link (and its anchor) resolves.
Nothing here loads a model.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest
import typer.main
import yaml
from pydantic import BaseModel

from smd_cli.app import user_config as settings
from smd_cli.app.cli import app
from smd_cli.core.errors import SmdError
from smd_cli.scenes.scene import Background, Bootstrap, Layer, Scene, validate_scene

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path) -> list[tuple[str, str]]:
    """The fenced code blocks of a page, as (language, text)."""
    return FENCE.findall(TEXT[page])


def prose(page: Path) -> str:
    """A page without its fenced code blocks."""
    return FENCE.sub("", TEXT[page])


def spans(page: Path) -> list[str]:
    """The inline code spans of a page (outside fenced blocks)."""
    return re.findall(r"`([^`]+)`", prose(page))


def code(pages: list[Path]) -> list[str]:
    """Every code block and inline code span of these pages."""
    return [text for page in pages for text in [body for _, body in blocks(page)] + spans(page)]


ALL_CODE = code(PAGES)
KEYS_PAGE = ROOT / "docs" / "keys.md"
KEYS_CODE = code([KEYS_PAGE])


def mentions(word: str, texts: list[str]) -> bool:
    """Whether `word` appears as a word (not part of a longer name) in some of `texts`."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")
    return any(pattern.search(text) for text in texts)


# --- The command line -----------------------------------------------------------------------------

GROUP = typer.main.get_command(app)
COMMANDS = dict(sorted(GROUP.commands.items()))


def flags(params) -> set[str]:
    return {flag for param in params for flag in (*param.opts, *param.secondary_opts) if flag.startswith("-")}


GLOBAL = flags(GROUP.params) | {"--help", "-h"}
OPTIONS = {command: flags(cmd.params) | {"--help", "-h"} for command, cmd in COMMANDS.items()}
ANY_OPTION = GLOBAL.union(*OPTIONS.values())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_and_option_is_documented(command):
    assert mentions(f"smd {command}", ALL_CODE), f"smd {command} is in neither README.md nor docs/"
    missing = sorted(flag for flag in OPTIONS[command] - {"--help", "-h"} if not mentions(flag, ALL_CODE))
    assert not missing, f"smd {command}: {', '.join(missing)} documented nowhere in README.md or docs/"


def test_the_global_options_are_documented():
    missing = sorted(flag for flag in GLOBAL if not mentions(flag, ALL_CODE))
    assert not missing, f"smd {', '.join(missing)} documented nowhere"


INVOCATION = re.compile(r"(?<![\w./-])(?:smd|-m smd_cli)[ \t]+(.*)")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def invocations(page: Path) -> list[tuple[str, str]]:
    """Each `smd ...` (or `python -m smd_cli ...`) the page shows in its code, as (where, the text
    after `smd`): in shell blocks up to a comment, pipe or `;`, and whole in an inline span."""
    found = []
    for language, body in blocks(page):
        if language == "python":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\"[^\"]*\"|'[^']*'", "''", line)
            line = re.split(r"\s#|\s\|\s|;|&&", " " + line)[0]
            found += [(line.strip(), m.group(1)) for m in INVOCATION.finditer(line)]
    for span in spans(page):
        found += [(span, m.group(1)) for m in INVOCATION.finditer(re.sub(r"\"[^\"]*\"", "''", span))]
    return found


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_command_and_option_shown_exists(page):
    wrong = []
    for where, rest in invocations(page):
        words = rest.split()
        command = words[0] if words else ""
        if command.startswith("-"):
            known = GLOBAL
        elif command.isupper():  # a placeholder: `smd COMMAND --help`
            known = ANY_OPTION
        elif command in COMMANDS:
            known = OPTIONS[command] | GLOBAL
        else:
            wrong.append(f"{where!r}: no command smd {command}")
            continue
        wrong += [f"{where!r}: smd {command} has no option {flag}" for flag in FLAG.findall(rest)
                  if flag not in known and flag != command]
    assert not wrong, f"{name(page)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_option_in_backticks_exists(page):
    """An inline span that starts with an option (`--seed N`, `-g`) names options of some command."""
    wrong = [f"{span!r}: {flag}" for span in spans(page) if span.startswith("-")
             for flag in FLAG.findall(span) if flag not in ANY_OPTION]
    assert not wrong, f"{name(page)}: options that no smd command has:\n" + "\n".join(wrong)


# --- Scene keys -----------------------------------------------------------------------------------

# The scene's nested mappings, as docs/keys.md writes their keys: `bootstrap.steps`, `layers[i].prompt`.
SECTIONS: dict[str, type[BaseModel]] = {"": Scene, "bootstrap.": Bootstrap, "background.": Background,
                                        "layers[i].": Layer}


def models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds, through lists, unions and Annotated."""
    found, todo = [], [annotation]
    while todo:
        item = todo.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            found.append(item)
        else:
            todo += get_args(item)
    return found


def entries() -> list[type[BaseModel]]:
    """Every other model a scene holds: mask forms, LoRA, ControlNet, reference and embedding entries."""
    seen: list[type[BaseModel]] = []
    todo = list(SECTIONS.values())
    while todo:
        for field in todo.pop().model_fields.values():
            for model in models_in(field.annotation):
                if model not in seen and model not in SECTIONS.values():
                    seen.append(model)
                    todo.append(model)
    return seen


def scene_keys() -> list[str]:
    return [prefix + key for prefix, model in SECTIONS.items() for key in model.model_fields
            if not (prefix == "" and f"{key}." in SECTIONS or key == "layers")]


@pytest.mark.parametrize("key", scene_keys())
def test_every_scene_key_is_in_the_keys_reference(key):
    assert mentions(key, KEYS_CODE), f"scene key {key} is not in docs/keys.md"


@pytest.mark.parametrize("model", entries(), ids=lambda model: model.__name__)
def test_every_entry_is_in_the_keys_reference_with_all_its_keys(model):
    """docs/keys.md lists each entry's keys together in one span, e.g. `{path, scale, sha256}`."""
    fields = list(model.model_fields)
    assert any(all(mentions(f, [text]) for f in fields) for text in KEYS_CODE), \
        f"docs/keys.md has no code span with all of {model.__name__}'s keys: {', '.join(fields)}"


def test_every_user_setting_is_documented():
    missing = [f"{key} ({env})" for key, env in settings.KEYS.items()
               if not (mentions(key, ALL_CODE) and mentions(env, ALL_CODE))]
    missing += [settings.CONFIG_ENV] if not mentions(settings.CONFIG_ENV, ALL_CODE) else []
    assert not missing, f"settings documented nowhere: {', '.join(missing)}"


def yaml_blocks() -> list[tuple[str, str]]:
    return [(f"{name(page)} #{i}", body) for page in PAGES
            for i, (language, body) in enumerate(b for b in blocks(page) if b[0] == "yaml")]


@pytest.mark.parametrize("where, body", yaml_blocks(), ids=[where for where, _ in yaml_blocks()])
def test_every_yaml_example_is_valid(where, body):
    """A scene passes smd's own validation (a snippet without layers gets one layer added); a block
    that begins `# config.yaml` is the user config file and holds only its keys."""
    data = yaml.safe_load(body)
    assert isinstance(data, dict), f"{where}: not a mapping"
    if body.startswith("# config.yaml"):
        unknown = set(data) - set(settings.KEYS)
        assert not unknown, f"{where}: the config file has no keys {sorted(unknown)}"
        return
    if "layers" not in data:
        data = {**data, "layers": [{"prompt": "a layer added to check the snippet"}]}
    try:
        validate_scene(data)
    except SmdError as exc:
        pytest.fail(f"{where}: {exc}")


def test_the_scene_shown_is_the_scene_shipped():
    shipped = (ROOT / "scenes" / "sunset-lake.yaml").read_text()
    assert shipped in [body for _, body in blocks(ROOT / "README.md")], \
        "README's sunset-lake.yaml differs from scenes/sunset-lake.yaml"


@pytest.mark.parametrize("where, body", [(f"{name(page)} #{i}", body) for page in PAGES
                                         for i, (language, body) in enumerate(blocks(page)) if language == "python"])
def test_every_python_example_parses(where, body):
    try:
        ast.parse(body)
    except SyntaxError as exc:
        pytest.fail(f"{where}: {exc}")


# --- Links ----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        anchor, n = base, 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_relative_link_resolves(page):
    text = re.sub(r"`[^`]+`", "", prose(page))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{name(page)}:\n" + "\n".join(broken)
