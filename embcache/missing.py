"""The missing-modality protocol (Lee et al., CVPR 2023), made deterministic per (seed, id).

A missing rate `rate` and a type:

- `image`: a fraction `rate` of the rows lose their image;
- `text`: a fraction `rate` of the rows lose their text;
- `both`: a fraction `rate` of the rows lose one modality, half of them the text and half the image;
  no row loses both.

Which rows lose what comes from a hash of (seed, id): each id gets a number u uniform in [0, 1), and
the row loses a modality when u < rate (for `both`: text when u < rate/2, image when rate/2 <= u < rate).
So the assignment does not depend on row order or on which other rows are in the split, and the rates
hold in expectation (binomial: at 7,799 rows and rate 0.7 the realised rate is within +-1.6 % with 99 %
probability).

The protocol is applied on top of what the data already lacks, with one rule: it never takes away a
row's last modality. A row that the data already lacks text for, say, keeps its image even when the
hash picks it to lose the image (such rows are few; the realised rate is then a little lower).

Test-time scenarios (`embcache eval`): `full` (nothing removed), `missing-image` (type `image`),
`missing-text` (type `text`) and `missing-both` (type `both`), all at the chosen rate.
"""
from __future__ import annotations

import hashlib

import numpy as np

from embcache.config import MISSING_TYPES  # noqa: F401 - re-exported: the allowed settings live in config.py
from embcache.datasets import MODALITIES  # noqa: F401 - re-exported: the modality names live in one place

SCENARIOS = ("full", "missing-image", "missing-text", "missing-both")
SCENARIO_TYPES = {"full": None, "missing-image": "image", "missing-text": "text", "missing-both": "both"}


def unit_hash(ids, seed: int, salt: str = "") -> np.ndarray:
    """One number in [0, 1) per id, a pure function of (salt, seed, id); another salt gives draws independent of
    the protocol's (which uses none)."""
    out = np.empty(len(ids), dtype=np.float64)
    prefix = f"{salt}{int(seed)}\x00".encode()
    for i, sample_id in enumerate(ids):
        digest = hashlib.blake2b(prefix + str(sample_id).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0 ** 64
    return out


def drop_masks(ids, rate: float, kind: str | None, seed: int) -> dict[str, np.ndarray]:
    """Rows the protocol removes, per modality (True = removed), before looking at the data."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate}")
    n = len(ids)
    drop = {m: np.zeros(n, dtype=bool) for m in MODALITIES}
    if kind is None or rate == 0.0:
        return drop
    if kind not in MISSING_TYPES:
        raise ValueError(f"unknown missing type {kind!r}; expected one of {MISSING_TYPES}")
    u = unit_hash(ids, seed)
    if kind == "both":
        drop["text"] = u < rate / 2
        drop["image"] = (u >= rate / 2) & (u < rate)
    else:
        drop[kind] = u < rate
    return drop


def apply_missing(ids, present: dict[str, np.ndarray], rate: float, kind: str | None,
                  seed: int) -> dict[str, np.ndarray]:
    """What each row still has after the protocol: the data's `present` minus the dropped modalities.

    A drop that would leave a row with neither modality is skipped (see the module docstring).
    """
    drop = drop_masks(ids, rate, kind, seed)
    image, text = (np.asarray(present[m], dtype=bool) for m in MODALITIES)
    return {
        "image": image & ~(drop["image"] & text),
        "text": text & ~(drop["text"] & image),
    }


def scenario_present(ids, present: dict[str, np.ndarray], scenario: str, rate: float,
                     seed: int) -> dict[str, np.ndarray]:
    """`apply_missing` for one of the named test scenarios."""
    if scenario not in SCENARIO_TYPES:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    return apply_missing(ids, present, rate, SCENARIO_TYPES[scenario], seed)


def scenario_of(kind: str | None, rate: float) -> str:
    """The scenario name matching a (type, rate) setting, e.g. ('both', 0.7) -> 'missing-both'."""
    if kind is None or rate == 0.0:
        return "full"
    return f"missing-{kind}"
