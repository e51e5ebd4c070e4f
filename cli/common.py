"""Small pieces every command uses: KEY=VALUE options, the one user-error handler, the protocol flags."""
from __future__ import annotations

import functools

import click

from embcache.config import MISSING_TYPES, FitConfig
from embcache.errors import EmbcacheError


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


def user_errors(fn):
    """A command's `EmbcacheError` (a user error, embcache/errors.py) -> one line `Error: ...` and exit code 1.
    Any other exception is a bug and propagates with its traceback."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EmbcacheError as exc:
            raise click.ClickException(str(exc)) from exc
    return inner


def protocol_options(fn):
    """The missing-modality protocol's flags (embcache/missing.py), with fit's defaults; `fit` and `tune` share
    them so that both hide the same rows."""
    d, rate = FitConfig(), click.FloatRange(0.0, 1.0)
    for option in reversed([
        click.option("--train-missing-rate", type=rate, default=d.train_missing_rate, show_default=True,
                     help="Rate of the training protocol (tune: train only on the rows that keep the modality)."),
        click.option("--train-missing-type", type=click.Choice(MISSING_TYPES), default=d.train_missing_type,
                     show_default=True),
        click.option("--test-missing-rate", type=rate, default=d.test_missing_rate, show_default=True,
                     help="Rate of the missing-* scenarios; the val one selects the best epoch."),
        click.option("--test-missing-type", type=click.Choice(MISSING_TYPES), default=d.test_missing_type,
                     show_default=True, help="The val scenario that selects the best epoch."),
        click.option("--missing-seed", type=int, default=d.missing_seed, show_default=True,
                     help="Seed of the protocol's hash (the same rows go missing for every run that uses it)."),
    ]):
        fn = option(fn)
    return fn
