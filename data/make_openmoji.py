"""Build a real image + text classification set whose modalities describe the same thing: OpenMoji's colour
emoji, by the rules of ``data/make_icons.py`` (read its docstring: label from the catalog's own category, text from
name + tags with every label word and boilerplate tag removed, image = the SVG rasterised once, split from the
sha256 of the id).

Why a third set: an icon is a black line drawing, so an ImageNet encoder sees little of what its tags say.  An
emoji is a colour picture of the thing its name names (a red apple, a dog's face, a flag), so this was to be the
real set whose image and text embeddings predict each other.  Measured, they do not more than the icons' (the
predictors' val R2 0.08 in complete training, against 0.05 on data/icons and 0.15 on tabler; BENCHMARKS.md,
stop 26): a third real set of its own kind all the same.

Usage (``make openmoji`` does all of this, from the npm registry, into ``bench-out/openmoji``)::

    npm pack openmoji@17.0.0 && tar xzf openmoji-17.0.0.tgz
    python -m pip install cairosvg==2.9.1          # build-time only, not a dependency of embcache
    python data/make_openmoji.py package --out bench-out/openmoji

Input: the unpacked npm package ``openmoji`` (graphics CC BY-SA 4.0): ``color/svg/<hexcode>.svg`` and
``data/openmoji.json`` (per emoji: ``hexcode``, ``group``, ``annotation``, ``tags``, ``openmoji_tags``,
``skintone``).  Kept: the Unicode emoji of the 9 Unicode groups other than ``component``, without their
skin-tone variants (a variant is its base emoji recoloured: near-copies across the splits); OpenMoji's own
``extras-*`` groups are left out (a catalogue of miscellanea, not a category).

Output: ``images/<id>.png`` (96x96 RGBA, transparent background), ``manifest.jsonl`` (``id, image, text, label,
split``; id = the annotation as a slug, e.g. ``red-apple``), ``LICENSE`` and ``README.md`` (counts, measured).
Not committed (5.6 MB of images; CC BY-SA): rebuild it with ``make openmoji``.
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_icons import arguments, boilerplate_tags, package_meta, write_icons  # noqa: E402
from make_tabler import write_readme  # noqa: E402

PACKAGE = "openmoji"
GROUPS = ("smileys-emotion", "people-body", "animals-nature", "food-drink", "travel-places", "activities",
          "objects", "symbols", "flags")

# Every word of the group names, with inflections (whole-token match; see make_icons.BANNED).
BANNED = frozenset("""
    smiley smileys smile smiles emotion emotions emotional people person persons body bodies animal animals
    nature natural food foods drink drinks drinking travel travels traveling travelling traveler traveller place
    places activity activities object objects symbol symbols flag flags
""".split())


def slug(annotation: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", annotation.lower()).strip("-")


def catalog(package: str) -> tuple[list[dict], collections.Counter]:
    """The kept emoji as icon dicts (``name`` = slug of the annotation, ``tags``, ``group``), and what was left
    out, counted by reason."""
    with open(os.path.join(package, "data", "openmoji.json"), encoding="utf-8") as f:
        entries = json.load(f)
    skipped, icons, seen = collections.Counter(), [], set()
    for e in entries:
        if e.get("skintone") not in ("", None):
            skipped["skin-tone variant"] += 1
        elif e["group"] not in GROUPS:
            skipped[f"group {e['group']}"] += 1
        else:
            name = slug(e["annotation"])
            if not name or name in seen:
                skipped["annotation empty or repeated"] += 1
                continue
            seen.add(name)
            tags = [t.strip() for field in ("tags", "openmoji_tags") for t in (e.get(field) or "").split(",")]
            icons.append({"name": name, "hexcode": e["hexcode"], "group": e["group"], "tags": [t for t in tags if t]})
    return sorted(icons, key=lambda icon: icon["name"]), skipped


def main(argv=None) -> None:
    args = arguments(__doc__).parse_args(argv)

    meta = package_meta(args.package, PACKAGE)
    icons, skipped = catalog(args.package)
    drop = boilerplate_tags(icons, "group")
    svgs = os.path.join(args.package, "color", "svg")
    rows, stripped = write_icons(icons, args.package, args.out,
                                 lambda icon: os.path.join(svgs, icon["hexcode"] + ".svg"),
                                 lambda icon: icon["group"].replace("-", "_"), drop, BANNED, args.size, skipped,
                                 "no colour SVG", license_file="LICENSE.txt")
    write_readme(args.out, meta, rows, drop, stripped, skipped,
                 title="OpenMoji: a real image + text dataset whose modalities describe the same thing",
                 script="data/make_openmoji.py", target="openmoji",
                 what=f"colour emoji, the {len(GROUPS)} Unicode emoji groups as classes")


if __name__ == "__main__":
    main()
