"""Build a larger real image + text classification set from the Tabler icon catalog, by the rules of
``data/make_icons.py`` (read its docstring: label from the catalog's own category, text from name + tags with every
label word and boilerplate tag removed, image = the SVG rasterised once, split from the sha256 of the id).

Usage (``make tabler`` does all of this, from the npm registry, into ``bench-out/tabler``)::

    npm pack @tabler/icons@3.35.0 && tar xzf tabler-icons-3.35.0.tgz
    python -m pip install cairosvg==2.9.1          # build-time only, not a dependency of embcache
    python data/make_tabler.py package --out bench-out/tabler

Input: the unpacked npm package ``@tabler/icons`` (MIT): ``icons/outline/<name>.svg`` and ``icons.json`` (per icon:
``name``, ``category``, ``tags``).  About 4,450 of its ~4,960 icons have a category; the others are left out.

Output: ``images/<name>.png`` (96x96 RGBA, strokes ``currentColor`` = black on a transparent background),
``manifest.jsonl`` (``id, image, text, label, split``), ``LICENSE`` and ``README.md`` (counts, measured).  Not
committed (about 5 MB of images, against the repository's size budget): rebuild it with ``make tabler``.
"""
from __future__ import annotations

import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_icons import arguments, boilerplate_tags, package_meta, write_icons  # noqa: E402

PACKAGE = "@tabler/icons"

# Tabler category -> class label.  Categories under 60 icons fold into the closest large one; "Sytem" is the
# catalog's own misspelling of "System".
MERGE = {
    "System": "system", "Sytem": "system",
    "Brand": "brand",
    "Devices": "devices", "Computers": "devices", "Electrical": "devices",
    "Arrows": "arrows",
    "Design": "design",
    "Map": "map",
    "Letters": "letters",
    "Numbers": "numbers",
    "Document": "document",
    "Text": "text",
    "Shapes": "shapes_symbols", "Symbols": "shapes_symbols", "Badges": "shapes_symbols", "Laundry": "shapes_symbols",
    "Media": "media", "Photography": "media",
    "E-commerce": "commerce", "Currencies": "commerce",
    "Communication": "communication",
    "Food": "food",
    "Math": "math", "Logic": "math",
    "Buildings": "buildings",
    "Vehicles": "vehicles",
    "Health": "health",
    "Sport": "sport_games", "Games": "sport_games",
    "Weather": "nature_weather", "Nature": "nature_weather", "Animals": "nature_weather",
    "Mood": "people", "Gestures": "people", "Gender": "people", "Zodiac": "people",
    "Database": "development", "Development": "development", "Version control": "development",
    "Extensions": "development", "Charts": "development",
}

# Every word of the class labels and of the source category names, with inflections (whole-token match).
BANNED = frozenset("""
    system systems sytem brand brands branding device devices computer computers computing electrical electric
    electricity arrow arrows design designs designer designing map maps mapping letter letters number numbers
    numeric document documents text texts textual shape shapes symbol symbols badge badges laundry media
    multimedia photography photo photos photograph commerce ecommerce e currency currencies communication
    communications communicate food foods math maths mathematics mathematical logic logical building buildings
    vehicle vehicles health healthy sport sports game games gaming weather nature natural animal animals people
    person mood moods gesture gestures gender genders zodiac database databases development develop developer
    developers version versions control extension extensions chart charts
""".split())


def main(argv=None) -> None:
    args = arguments(__doc__).parse_args(argv)

    meta = package_meta(args.package, PACKAGE)
    with open(os.path.join(args.package, "icons.json"), encoding="utf-8") as f:
        catalog = sorted(json.load(f).values(), key=lambda icon: icon["name"])
    for icon in catalog:  # a few tags are numbers or null in the catalog
        icon["tags"] = [str(t) for t in icon.get("tags") or [] if t is not None]
    icons = [icon for icon in catalog if icon.get("category")]
    unknown = sorted({icon["category"] for icon in icons} - set(MERGE))
    if unknown:
        sys.exit(f"categories without a class in MERGE: {unknown}")

    drop = boilerplate_tags(icons, "category")
    skipped = collections.Counter({"no category": len(catalog) - len(icons)})
    outline = os.path.join(args.package, "icons", "outline")
    rows, stripped = write_icons(icons, args.package, args.out,
                                 lambda icon: os.path.join(outline, icon["name"] + ".svg"),
                                 lambda icon: MERGE[icon["category"]], drop, BANNED, args.size, skipped,
                                 "no outline SVG")
    write_readme(args.out, meta, rows, drop, stripped, skipped,
                 title="Tabler icons: a larger real image + text dataset", script="data/make_tabler.py",
                 target="tabler", what="style `outline`, classes from the catalog's own categories")


def write_readme(out: str, meta: dict, rows: list[dict], drop: dict, stripped: collections.Counter,
                 skipped: collections.Counter, title: str, script: str, target: str, what: str) -> None:
    """out/README.md of a set built by the rules of data/icons but not committed (make `target` rebuilds it)."""
    count = collections.Counter((row["label"], row["split"]) for row in rows)
    classes = sorted({row["label"] for row in rows})
    table = ["| class | train | val | test |", "|---|---:|---:|---:|"]
    table += [f"| `{c}` | {count[c, 'train']} | {count[c, 'val']} | {count[c, 'test']} |" for c in classes]
    kinds = collections.Counter()
    for key, n in stripped.items():
        kinds[key.split(":")[0]] += n
    examples = "\n".join(f"    {json.dumps(row, ensure_ascii=False)}" for row in rows[:: max(1, len(rows) // 5)][:5])
    text = f"""# {title}

Written by `{script}` (`make {target}`) from [`{meta['name']}`](https://www.npmjs.com/package/{meta['name']})
version **{meta['version']}** ({meta.get('license', '?')} licence, copied to LICENSE): {len(rows)} rows, {what}
({len(classes)}), by the rules of `data/icons` (label words and boilerplate tags removed from every text; split
from the sha256 of the id). Not committed: rebuild it.

{examples}

Boilerplate tags dropped: {", ".join(f"`{t}` ({c})" for t, c in drop.items()) or "none"}.
Removed: {"; ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))}.
Rows left out: {", ".join(f"{k}: {n}" for k, n in skipped.items())}.

{chr(10).join(table)}
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


if __name__ == "__main__":
    main()
