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

from smd_cli.core.errors import SmdError

KEYS = {"model": "SMD_MODEL", "lcm_lora": "SMD_LCM_LORA", "device": "SMD_DEVICE", "dtype": "SMD_DTYPE"}
CONFIG_ENV = "SMD_CONFIG"


def config_path() -> Path | None:
    """Where the user config file is: `SMD_CONFIG`, else config.yaml in the platform's config folder;
    None where there is no such folder (no home folder and no `XDG_CONFIG_HOME`: a service account)."""
    from smd_cli.core.files import expand_user

    if os.environ.get(CONFIG_ENV):
        return expand_user(os.environ[CONFIG_ENV])
    from platformdirs import user_config_dir

    try:
        return Path(user_config_dir("smd")) / "config.yaml"
    except (RuntimeError, KeyError, OSError):  # platformdirs found no home folder to put it in
        return None




def read_config(path: Path | None = None) -> dict[str, str]:
    """The user config file's settings ({} when there is none); a broken file is an error naming it,
    and so is a missing one that `SMD_CONFIG` names. Read again only when the file changes."""
    from smd_cli.core.files import MAX_SCENE_BYTES, UnreadableFile, read_bytes

    named = path is not None or bool(os.environ.get(CONFIG_ENV))
    path = path or config_path()
    if path is None:  # no home folder: no config file, which is optional
        return {}
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in _read:
            _read.clear()
            _read[key] = _parse_config(read_bytes(path, MAX_SCENE_BYTES), path)
    except FileNotFoundError:
        if named:
            raise SmdError(f"{path}: no such smd config file (named by {CONFIG_ENV}); create it, or unset "
                           f"{CONFIG_ENV}") from None
        return {}
    except (UnreadableFile, OSError) as exc:
        raise SmdError(f"{path}: cannot read the smd config file: {exc}") from None
    return dict(_read[key])


_read: dict[tuple, dict[str, str]] = {}  # the config file last read, by (path, modification time, size)


def _parse_config(data: bytes, path: Path) -> dict[str, str]:
    from smd_cli.scenes.scene import parse_mapping

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SmdError(f"{path}: cannot read the smd config file: {exc}") from None
    config, _ = parse_mapping(text, path, allow_empty=True)
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SmdError(f"{path}: the smd config file is a mapping of {', '.join(KEYS)} to text")
    for key, value in config.items():
        if key not in KEYS:
            raise SmdError(f"{path}: unknown key {key!r} in the smd config file; known keys: {', '.join(KEYS)}")
        if not isinstance(value, str) or not value.strip():
            raise SmdError(f"{path}: {key} must be text, got {value!r}")
    return config


def user_default(key: str) -> str | None:
    """Your default for `key` (one of `KEYS`): its environment variable, else the config file's."""
    value = os.environ.get(KEYS[key], "").strip()
    return value or read_config().get(key)
