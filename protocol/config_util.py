"""Loading TOML config files into pydantic models with errors that name file, key, problem."""

from __future__ import annotations

import tomllib
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """The config file is missing, not TOML, or fails validation."""


def load_toml_model(path: str, model: type[M]) -> M:
    """Read ``path`` as TOML and validate it as ``model``.

    Raises:
        ConfigError: "FILE: KEY: problem" for the first few problems found.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:5]:
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{path}: {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc
