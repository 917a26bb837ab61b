"""The README documents every command, every option of every command, and every scene key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from smd_cli.scene import MASK_FORMS, Background, Bootstrap, Layer, Scene

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```[a-z]*\n(.*?)```", README, re.S)
CODE_SPANS = BLOCKS + re.findall(r"`([^`]+)`", re.sub(r"```[a-z]*\n.*?```", "", README, flags=re.S))


def documented(name: str) -> bool:
    """Whether `name` appears as a word inside some code span or code block of the README."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    return any(pattern.search(span) for span in CODE_SPANS)


def scene_keys() -> list[str]:
    """Every key a scene may have, as the README writes it: `seed`, `bootstrap.steps`, `layers[i].prompt`."""
    nested: dict[str, type[BaseModel]] = {"bootstrap": Bootstrap, "background": Background, "layers[i]": Layer}
    keys = [name for name in Scene.model_fields if name not in ("bootstrap", "background", "layers")]
    for prefix, model in nested.items():
        keys += [f"{prefix}.{name}" for name in model.model_fields]
    return keys


@pytest.mark.parametrize("key", scene_keys())
def test_every_scene_key_is_in_the_readme(key):
    assert documented(key), f"scene key {key} is not in README.md"


@pytest.mark.parametrize("key", sorted({k for form in MASK_FORMS.values() for k in form.model_fields}))
def test_every_mask_key_is_in_the_readme(key):
    assert documented(key), f"mask key {key} is not in README.md"


def commands() -> list:
    import typer.main

    from smd_cli.cli import app

    group = typer.main.get_command(app)
    return sorted(group.commands.items())


@pytest.mark.parametrize("name, command", commands(), ids=[name for name, _ in commands()])
def test_every_command_and_option_is_in_the_readme(name, command):
    assert documented(f"smd {name}"), f"command smd {name} is not in README.md"
    for param in command.params:
        for flag in param.opts:
            if flag.startswith("--") and flag != "--help":
                assert documented(flag), f"smd {name} {flag} is not in README.md"


def test_the_scene_shown_is_the_scene_shipped():
    shipped = (Path(__file__).resolve().parents[1] / "scenes" / "sunset-lake.yaml").read_text()
    assert shipped in BLOCKS, "README's sunset-lake.yaml differs from scenes/sunset-lake.yaml"
