"""Your own defaults, from the environment and a config file, below the command line and scenes.

Precedence, highest first: a command-line flag, the scene's key (or an image's record), an
`SMD_*` environment variable, the user config file, then smd's built-in default. The config file
is YAML, `config.yaml` in the platform's config folder (`~/.config/smd/config.yaml` on Linux;
`SMD_CONFIG` names another), with any of the keys below:

    model: ~/models/dreamshaper-8        # SMD_MODEL
    lcm_lora: auto                       # SMD_LCM_LORA
    device: cuda:1                       # SMD_DEVICE
    dtype: float16                       # SMD_DTYPE

No torch at import.
"""

from __future__ import annotations

import os
from pathlib import Path

from smd_cli.errors import SmdError

KEYS = {"model": "SMD_MODEL", "lcm_lora": "SMD_LCM_LORA", "device": "SMD_DEVICE", "dtype": "SMD_DTYPE"}
CONFIG_ENV = "SMD_CONFIG"


def config_path() -> Path:
    """Where the user config file is: `SMD_CONFIG`, else config.yaml in the platform's config folder."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("smd")) / "config.yaml"


def read_config(path: Path | None = None) -> dict[str, str]:
    """The user config file's settings ({} when there is none); a broken file is an error naming it."""
    import yaml

    from smd_cli.files import MAX_SCENE_BYTES, UnreadableFile, read_bytes
    from smd_cli.scene import depth_within

    path = path or config_path()
    try:
        data = yaml.safe_load(read_bytes(path, MAX_SCENE_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (UnreadableFile, OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise SmdError(f"{path}: cannot read the smd config file: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not depth_within(data, 2):
        raise SmdError(f"{path}: the smd config file is a mapping of {', '.join(KEYS)} to text")
    for key, value in data.items():
        if key not in KEYS:
            raise SmdError(f"{path}: unknown key {key!r} in the smd config file; known keys: {', '.join(KEYS)}")
        if not isinstance(value, str) or not value.strip():
            raise SmdError(f"{path}: {key} must be text, got {value!r}")
    return data


def user_default(key: str) -> str | None:
    """Your default for `key` (one of `KEYS`): its environment variable, else the config file's."""
    value = os.environ.get(KEYS[key], "").strip()
    return value or read_config().get(key)
