"""Loading TOML config files into pydantic models with errors that name file, key, problem."""

from __future__ import annotations

import tomllib
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

M = TypeVar("M", bound=BaseModel)

# pydantic's wording → ours, for the problems an operator meets most (issue 7: the
# message says the key and why, one line each).
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


class ConfigError(Exception):
    """The config file is missing, not TOML, or fails validation.

    ``problems`` holds one "FILE: KEY: why" line per problem; ``str()`` joins them.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:7100"); raise ValueError naming the problem."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


def require_tls_files(model: BaseModel) -> None:
    """With ``tls = true``, the model's tls_ca, tls_cert and tls_key must all be set.

    Raises:
        ValueError: naming the missing keys.
    """
    if getattr(model, "tls", False):
        missing = [k for k in ("tls_ca", "tls_cert", "tls_key") if not getattr(model, k)]
        if missing:
            raise ValueError(f"tls = true needs {', '.join(missing)}")


def _key(loc: tuple[int | str, ...]) -> str:
    """``("connection", 0, "tls")`` → ``connection[0].tls``; the empty loc is the file."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else part)
    return key or "(top level)"


def _problem(err: ErrorDetails) -> str:
    if err["type"] in _MESSAGES:
        return _MESSAGES[err["type"]]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error" and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def validation_problems(path: str, exc: ValidationError) -> list[str]:
    """One "FILE: KEY: why" line per error of ``exc``, every error included."""
    return [f"{path}: {_key(tuple(err['loc']))}: {_problem(err)}" for err in exc.errors()]


def load_toml_model(path: str, model: type[M]) -> M:
    """Read ``path`` as TOML and validate it as ``model``.

    Raises:
        ConfigError: with one "FILE: KEY: problem" line per problem found.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_problems(path, exc)) from exc
