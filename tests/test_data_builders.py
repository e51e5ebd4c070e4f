"""The rules of the scripts in data/ that build the real benchmark sets (the parts that need no rasteriser)."""
import collections
import importlib.util
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def _script(name):
    sys.path.insert(0, str(DATA))  # the scripts import each other, as when run from data/
    try:
        spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(DATA))


def test_openmoji_keeps_one_row_per_unicode_emoji_and_no_label_word_in_its_text(tmp_path):
    openmoji, icons = _script("make_openmoji"), _script("make_icons")
    entries = [
        {"hexcode": "1F34E", "group": "food-drink", "annotation": "red apple", "tags": "fruit, red",
         "openmoji_tags": "food, healthy snack", "skintone": ""},
        {"hexcode": "1F44D", "group": "people-body", "annotation": "thumbs up", "tags": "hand, +1",
         "openmoji_tags": "", "skintone": ""},
        {"hexcode": "1F44D-1F3FB", "group": "people-body", "annotation": "thumbs up: light skin tone", "tags": "",
         "openmoji_tags": "", "skintone": 1},
        {"hexcode": "1F1E9-1F1EA", "group": "flags", "annotation": "flag: Germany", "tags": "DE",
         "openmoji_tags": "", "skintone": ""},
        {"hexcode": "E000", "group": "extras-openmoji", "annotation": "github", "tags": "", "openmoji_tags": "",
         "skintone": ""},
        {"hexcode": "1F3FB", "group": "component", "annotation": "light skin tone", "tags": "", "openmoji_tags": "",
         "skintone": ""},
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "openmoji.json").write_text(json.dumps(entries))
    rows, skipped = openmoji.catalog(str(tmp_path))
    assert [(r["name"], r["hexcode"], r["group"]) for r in rows] == [
        ("flag-germany", "1F1E9-1F1EA", "flags"), ("red-apple", "1F34E", "food-drink"),
        ("thumbs-up", "1F44D", "people-body")]
    assert skipped == collections.Counter({"skin-tone variant": 1, "group extras-openmoji": 1, "group component": 1})
    texts = {r["name"]: icons.make_text(r, set(), collections.Counter(), openmoji.BANNED) for r in rows}
    # the class words (food, flag) leave the name and take their tags with them; other words stay
    assert texts == {"flag-germany": "germany: DE", "red-apple": "red apple: fruit, red, healthy snack",
                     "thumbs-up": "thumbs up: hand, +1"}
