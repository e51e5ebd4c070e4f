"""Build ``data/icons``: a small real image + text classification set from the Phosphor icon catalog.

Usage (``make icons`` does all of this, from the npm registry)::

    npm pack @phosphor-icons/core@2.1.1 && tar xzf phosphor-icons-core-2.1.1.tgz
    python -m pip install cairosvg==2.9.1          # build-time only, not a dependency of embcache
    python data/make_icons.py package --out data/icons

Input: the unpacked npm package ``@phosphor-icons/core`` (MIT): ``assets/<style>/<name>.svg`` and the
catalog in ``dist/index.mjs`` (per icon: ``name``, ``tags``, ``categories``, ``figma_category``).  The catalog
is a JavaScript module; it is read here without Node by turning its one array literal into JSON.

Output (everything below ``--out`` that this script owns is rewritten; nothing else is touched):

* ``images/<name>.png``: each SVG of one style (default ``regular``) rasterised ONCE with cairosvg to
  ``--size`` x ``--size`` (default 96) RGBA, ``currentColor`` = black on a TRANSPARENT background, as icon files
  are.  Re-encoded with Pillow (``optimize=True``, no metadata), so the bytes are stable for pinned versions.
* ``manifest.jsonl``: the generic manifest (``embcache.datasets._read_manifest``), one JSON object per line,
  sorted by id: ``id`` (the icon name), ``image`` (relative to the manifest), ``text``, ``label``, ``split``.
* ``LICENSE`` (copied from the package) and ``README.md`` (rules, measured counts).

Rules (deterministic; the same input gives the same output):

1. **Label** = the icon's ``figma_category``: Phosphor's own single, curated category (the multi-valued
   ``categories`` list is not used, so no tie-break rule is needed).  The 18 Figma categories are merged into
   12 classes with at least 60 icons each (``MERGE`` below: small ones fold into the closest large one).
2. **Text** = the icon name (``-`` -> space) + ``": "`` + its tags joined by ``", "``, after removing leaks:
   - every word of every class / source-category name, with its inflections (``BANNED``; e.g. ``arrow``,
     ``arrowhead``, ``logo``, ``person``, ``timer``), is removed from the name and any tag containing such a word
     is dropped.  This is applied to EVERY row, whatever its label, so that the absence of a word tells nothing;
   - version markers ``*new*`` / ``*updated*`` are dropped;
   - "boilerplate" tags are dropped: a tag on >= 50% of one source category's icons (and >= 10 of them) with
     >= 90% of its uses in that category (e.g. ``pointer, pointing, directional`` on 96% of the arrows) is that
     category under another name.  The list is computed from the catalog and written to the README;
   - duplicate tags are dropped (first kept).  A name left empty gives a text of the tags only; a row whose
     text would be empty is dropped (counted in the README).
3. **Split** from the sha256 of the id: first 8 bytes / 2**64 < 0.70 -> train, < 0.85 -> val, else test.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import re
import shutil
import sys

PACKAGE = "@phosphor-icons/core"

# Figma category -> class label.  Small categories (< 60 icons) fold into the closest large one.
MERGE = {
    "arrows": "arrows",
    "brands": "brands",
    "commerce": "commerce",
    "communication": "communication",
    "design": "design",
    "maps & travel": "maps_travel",
    "math & finance": "finance",
    "media": "media_games",
    "games": "media_games",
    "office & editing": "office_education",
    "education": "office_education",
    "time": "office_education",
    "people": "people_health",
    "health & wellness": "people_health",
    "system & devices": "system_devices",
    "technology & development": "system_devices",
    "security & warnings": "system_devices",
    "weather & nature": "nature_weather",
}

# Every word of the class labels and of the source category names, with inflections and the words that
# contain them (whole-token match, lower case).  "logo(s)" is here because Phosphor names every brand icon
# "<brand>-logo": it is the class name in another form.
BANNED = frozenset("""
    arrow arrows arrowhead arrowheads
    brand brands branding logo logos
    commerce commercial ecommerce
    communication communications communicate communicating
    design designs designer designers designing
    map maps mapping travel travels traveling travelling traveler travelers traveller travellers
    math maths mathematics mathematical finance finances financial financing
    media multimedia game games gaming
    office offices edit edits editing editor editors education educational
    time times timer timers
    people person persons health healthy wellness
    system systems device devices technology technologies technological tech
    development develop developer developers
    security secure secured warning warnings warn
    weather nature natural
""".split())
VERSION_MARKERS = frozenset({"*new*", "*updated*"})
BOILERPLATE_COVERAGE, BOILERPLATE_PURITY, BOILERPLATE_MIN = 0.50, 0.90, 10
SPLITS = ((0.70, "train"), (0.85, "val"), (1.0, "test"))


def tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^0-9a-z]+", text.lower()) if t]


def read_catalog(package: str) -> list[dict]:
    """The ``icons`` array of ``dist/index.mjs`` as a list of dicts (enum references resolved)."""
    path = os.path.join(package, "dist", "index.mjs")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    enums = {}  # variable -> {MEMBER: value}, from `e = /* @__PURE__ */ ((i) => (i.A = "a", ...))(e || {})`
    for m in re.finditer(r"(\w+) = /\* @__PURE__ \*/ \(\((\w+)\) => \((.*?)\)\)\(\1 \|\| \{\}\)", src, re.S):
        enums[m.group(1)] = dict(re.findall(re.escape(m.group(2)) + r'\.(\w+) = "([^"]*)"', m.group(3)))
    m = re.search(r"const (\w+) = (\[.*?\n\]);", src, re.S)
    if not enums or not m:
        sys.exit(f"{path}: layout not recognised (expected enum IIFEs and one `const x = [...]` array)")
    parts = re.split(r'("(?:[^"\\]|\\.)*")', m.group(2))  # string literals at odd indices stay untouched
    for i in range(0, len(parts), 2):
        part = re.sub(r"\b([A-Za-z_]\w*)\.([A-Z_][A-Z0-9_]*)\b",
                      lambda x: json.dumps(enums[x.group(1)][x.group(2)]) if x.group(1) in enums else x.group(0),
                      parts[i])
        part = re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r'\1"\2":', part)  # bare keys
        parts[i] = re.sub(r",(\s*[\]}])", r"\1", part)  # trailing commas
    try:
        return json.loads("".join(parts))
    except json.JSONDecodeError as exc:
        sys.exit(f"{path}: could not read the icon array as JSON ({exc})")


def boilerplate_tags(icons: list[dict], category: str = "figma_category") -> dict[str, str]:
    """Tags that stand for a whole source category (the icon field `category`): tag -> that category."""
    size = collections.Counter(icon[category] for icon in icons)
    uses = collections.defaultdict(collections.Counter)
    for icon in icons:
        for tag in set(icon["tags"]):
            uses[tag][icon[category]] += 1
    out = {}
    for tag, by_cat in uses.items():
        cat, n = by_cat.most_common(1)[0]
        if (n >= BOILERPLATE_MIN and n / size[cat] >= BOILERPLATE_COVERAGE
                and n / sum(by_cat.values()) >= BOILERPLATE_PURITY):
            out[tag] = cat
    return dict(sorted(out.items()))


def make_text(icon: dict, drop: set[str], stripped: collections.Counter, banned: frozenset = BANNED) -> str:
    words = []
    for word in icon["name"].replace("_", "-").split("-"):
        if word and word.lower() in banned:
            stripped["name word: " + word.lower()] += 1
        elif word:
            words.append(word)
    tags = []
    for tag in icon["tags"]:
        tag = " ".join(tag.split())
        if tag in VERSION_MARKERS:
            stripped["version marker: " + tag] += 1
        elif tag in drop:
            stripped["boilerplate tag: " + tag] += 1
        elif any(t in banned for t in tokens(tag)):
            stripped["tag with a label word: " + tag] += 1
        elif tag and tag not in tags:
            tags.append(tag)
    name = " ".join(words)
    return f"{name}: {', '.join(tags)}" if name and tags else (name or ", ".join(tags))


def split_of(icon_id: str) -> str:
    u = int.from_bytes(hashlib.sha256(icon_id.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    return next(name for bound, name in SPLITS if u < bound)


def rasterise(svg: bytes, size: int) -> bytes:
    import cairosvg  # build-time only
    from PIL import Image

    png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
    image = Image.open(io.BytesIO(png))
    image.load()
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def package_meta(package: str, expected: str) -> dict:
    """The unpacked npm package's package.json; exits unless the package is `expected`."""
    with open(os.path.join(package, "package.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("name") != expected:
        sys.exit(f"{package}: is {meta.get('name')!r}, expected {expected}")
    return meta


def write_icons(icons: list[dict], package: str, out: str, svg_path, label, drop: dict, banned: frozenset,
                size: int, skipped: collections.Counter, no_svg: str, license_file: str = "LICENSE"
                ) -> tuple[list[dict], collections.Counter]:
    """Rasterise each icon's SVG (`svg_path(icon)`) into out/images and write out/manifest.jsonl (label
    `label(icon)`, text by `make_text`) and out/LICENSE (the package's `license_file`). Icons left out are counted
    in `skipped` (`no_svg`: the reason for a missing SVG). Returns (rows, what the texts lost)."""
    images_dir = os.path.join(out, "images")
    if os.path.isdir(images_dir):
        shutil.rmtree(images_dir)
    os.makedirs(images_dir)
    stripped, rows = collections.Counter(), []
    for icon in icons:
        name = icon["name"]
        path = svg_path(icon)
        if not os.path.isfile(path):
            skipped[no_svg] += 1
            continue
        text = make_text(icon, set(drop), stripped, banned)
        if not text:
            skipped["empty text after stripping"] += 1
            continue
        with open(path, "rb") as f:
            png = rasterise(f.read(), size)
        with open(os.path.join(images_dir, name + ".png"), "wb") as f:
            f.write(png)
        rows.append({"id": name, "image": f"images/{name}.png", "text": text, "label": label(icon),
                     "split": split_of(name)})
    with open(os.path.join(out, "manifest.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copyfile(os.path.join(package, license_file), os.path.join(out, "LICENSE"))
    counts = collections.Counter(row["split"] for row in rows)
    print(f"{len(rows)} rows, {len(set(r['label'] for r in rows))} classes, "
          f"{dict(sorted(counts.items()))}; skipped {dict(skipped) or 'none'} -> {out}")
    return rows, stripped


def arguments(doc: str, out: str | None = None) -> argparse.ArgumentParser:
    """The command line every set builder in data/ shares: the unpacked package, --out (required unless `out`
    gives a default), --size; a builder adds its own options."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("package", help="unpacked npm package folder (the one holding package.json)")
    ap.add_argument("--out", default=out, required=out is None)
    ap.add_argument("--size", type=int, default=96, help="PNG width and height in pixels")
    return ap


def main(argv=None) -> None:
    ap = arguments(__doc__, out=os.path.join(os.path.dirname(os.path.abspath(__file__)), "icons"))
    ap.add_argument("--style", default="regular", help="regular, thin, light, bold, fill or duotone")
    args = ap.parse_args(argv)

    meta = package_meta(args.package, PACKAGE)
    icons = sorted(read_catalog(args.package), key=lambda icon: icon["name"])
    unknown = sorted({icon["figma_category"] for icon in icons} - set(MERGE))
    if unknown:
        sys.exit(f"figma categories without a class in MERGE: {unknown}")
    assets = os.path.join(args.package, "assets", args.style)
    suffix = "" if args.style == "regular" else "-" + args.style

    drop = boilerplate_tags(icons)
    skipped = collections.Counter()
    rows, stripped = write_icons(icons, args.package, args.out,
                                 lambda icon: os.path.join(assets, icon["name"] + suffix + ".svg"),
                                 lambda icon: MERGE[icon["figma_category"]], drop, BANNED, args.size, skipped,
                                 "no SVG in style " + args.style)
    write_readme(args, meta, icons, rows, drop, stripped, skipped)


def write_readme(args, meta, icons, rows, drop, stripped, skipped) -> None:
    classes = sorted({row["label"] for row in rows})
    count = collections.Counter((row["label"], row["split"]) for row in rows)
    sources = collections.defaultdict(list)
    for cat, label in MERGE.items():
        sources[label].append(cat)
    src_size = collections.Counter(icon["figma_category"] for icon in icons)
    table = ["| class | Figma categories merged (icons) | train | val | test | total |",
             "|---|---|---:|---:|---:|---:|"]
    for c in classes:
        merged = ", ".join(f"{cat} ({src_size[cat]})" for cat in sources[c])
        per = [count[c, s] for s in ("train", "val", "test")]
        table.append(f"| `{c}` | {merged} | {per[0]} | {per[1]} | {per[2]} | {sum(per)} |")
    tot = [sum(count[c, s] for c in classes) for s in ("train", "val", "test")]
    table.append(f"| **all** | {len(icons)} icons in the catalog | {tot[0]} | {tot[1]} | {tot[2]} | {sum(tot)} |")
    kinds = collections.Counter()
    for key, n in stripped.items():
        kinds[key.split(":")[0]] += n
    top_words = ", ".join(f"`{k.split(': ', 1)[1]}` {n}" for k, n in stripped.most_common()
                          if k.startswith("name word"))
    examples = "\n".join(f"    {json.dumps(row, ensure_ascii=False)}" for row in rows[:: max(1, len(rows) // 6)][:6])
    train_first = {row["id"].split("-")[0] for row in rows if row["split"] == "train"}
    test_rows = [row for row in rows if row["split"] == "test"]
    siblings = f"{sum(row['id'].split('-')[0] in train_first for row in test_rows)} of {len(test_rows)}"
    text = README.format(siblings=siblings,
        package=meta["name"], version=meta["version"], license=meta.get("license", "?"), style=args.style,
        size=args.size, n_rows=len(rows), n_classes=len(classes), n_icons=len(icons), table="\n".join(table),
        boilerplate=", ".join(f"`{t}` ({c})" for t, c in drop.items()),
        banned=" ".join(f"`{w}`" for w in sorted(BANNED)),
        stripped_counts="; ".join(f"{k}: {n}" for k, n in sorted(kinds.items())),
        top_words=top_words, skipped=", ".join(f"{k}: {n}" for k, n in skipped.items()) or "none",
        examples=examples)
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


README = """\
# Icons: a small real image + text dataset

{n_rows} icons of [`{package}`](https://www.npmjs.com/package/{package}) version **{version}** ({license}
licence, copied to [LICENSE](LICENSE)), style `{style}`, each as a {size}x{size} RGBA PNG (black strokes on a
transparent background) with a short text built from its name and tags; {n_classes} classes from Phosphor's own
icon categories.  A real-data accuracy benchmark for embcache: the same rows for everyone, built offline from
the package registries.

```bash
make icons        # npm pack {package}@{version} into a temp dir, pip install cairosvg, run data/make_icons.py
HF_HUB_OFFLINE=1 embcache extract --dataset manifest --root data/icons/manifest.jsonl --out icons.zarr
```

`manifest.jsonl` is the generic manifest (`id, image, text, label, split`; the image path is relative to it).
This file, the manifest, `images/` and `LICENSE` are all written by `data/make_icons.py`; edit the script, not
them.  Example rows:

{examples}

## Rules

- **Label**: the icon's `figma_category`, Phosphor's single curated category (its multi-valued `categories` list
  is not used, so there is no tie-break).  The 18 categories are merged into {n_classes} classes with >= 60 icons
  each, as in the table.  Single-label multiclass; classes in sorted order.
- **Text**: `name words: tag, tag, ...` (name `-` -> space), after removing leaks, on every row whatever its label
  (so the absence of a word says nothing about the class):
  - every word of every class and source-category name, with inflections, is removed from the name, and a tag
    containing one (as a whole word) is dropped: {banned}.  `logo(s)` is there because every brand icon is named
    `<brand>-logo`; `timer` because it contains `time` (a source category).  Most removed name words: {top_words};
  - version markers `*new*` and `*updated*` are dropped;
  - boilerplate tags are dropped: a tag on >= 50% of one source category's icons (>= 10 of them) with >= 90% of
    its uses there, i.e. the category under another name: {boilerplate};
  - duplicate tags are dropped.  An icon whose name is all label words (e.g. `person`, `warning`) keeps only its
    tags.  Removed in total: {stripped_counts}.  Rows dropped: {skipped}.
- **Image**: `assets/{style}/<name>.svg` rasterised once with cairosvg to {size}x{size}, kept RGBA with its
  transparency (`currentColor` = black).  Decoding must composite on a light background, as embcache's decoder
  does (`embcache/images.py`, rules `rgb-on-white/1`): dropping alpha gives an all-black image for every icon,
  since every pixel, stroke or background, is stored with RGB (0, 0, 0).
- **Split**: sha256 of the id, first 8 bytes / 2^64: < 0.70 train, < 0.85 val, else test.

## Counts (measured)

{table}

## What to expect

- Measured for this build (1512 rows; `embcache extract` with the offline defaults, EfficientNet-Lite0 ImageNet +
  all-MiniLM-L6-v2, decoder `rgb-on-white/1`; then a multinomial logistic regression on L2-normalised,
  standardised embeddings, C chosen on val from 0.01-1, trained on train): test accuracy **text 0.847**, **image
  0.460**, **image + text concatenated 0.817**; majority class 0.183.  With alpha dropped instead (all images
  black) image-only can do no better than the majority class.  A fitted model should reach about the text-only
  level; a fusion that beats text alone is using the images well.
- Both modalities carry the label, neither trivially: names such as `caret down`, `chat circle` or `shopping cart`
  still say a lot, images are small line drawings the ImageNet encoder was not trained on.
- Icons come in families (`calendar-plus`, `calendar-minus`, ...) and the split is per icon, so most test icons
  ({siblings}) share their first name word with a train icon, often with a near-identical image and text:
  this measures recognition within known families more than generalisation to new kinds of icons.
- Some classes overlap in meaning (`office_education` vs `system_devices`, `commerce` vs `maps_travel`), so a
  ceiling well below 100% is expected.
- The test split is small (~15%, about 10-40 icons per class): differences of a few points are noise.
"""


if __name__ == "__main__":
    main()
