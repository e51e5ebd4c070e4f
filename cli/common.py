"""Small pieces every command uses."""
from __future__ import annotations

import functools

import click


def parse_options(pairs: tuple[str, ...]) -> dict:
    """`KEY=VALUE` pairs -> dict, numbers parsed as numbers."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key.replace("-", "_")] = value
    return options


def user_errors(*error_types: type[Exception]):
    """Turn the library's own error types into a clean `Error: ...` and exit code 1, no traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except error_types as exc:
                raise click.ClickException(str(exc)) from exc
        return inner
    return wrap
