"""The missing-modality protocol: deterministic per (seed, id), the right rates, never both lost."""
import numpy as np
import pytest

from embcache.missing import SCENARIOS, apply_missing, drop_masks, scenario_present, unit_hash

N = 20_000
IDS = np.array([f"id-{i}" for i in range(N)], dtype=object)
ALL = {"image": np.ones(N, dtype=bool), "text": np.ones(N, dtype=bool)}


def test_deterministic_per_seed_and_id_independent_of_order_and_neighbours():
    a = drop_masks(IDS, 0.7, "both", seed=3)
    assert all(np.array_equal(a[m], drop_masks(IDS, 0.7, "both", seed=3)[m]) for m in a)
    order = np.random.default_rng(0).permutation(N)
    shuffled = drop_masks(IDS[order], 0.7, "both", seed=3)
    subset = drop_masks(IDS[:100], 0.7, "both", seed=3)
    for m in a:
        assert np.array_equal(shuffled[m], a[m][order])
        assert np.array_equal(subset[m], a[m][:100])
    other = drop_masks(IDS, 0.7, "both", seed=4)
    assert not np.array_equal(other["text"], a["text"])


def test_unit_hash_is_uniform():
    u = unit_hash(IDS, 0)
    assert u.min() >= 0 and u.max() < 1
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(counts / N - 0.1) < 0.01)


@pytest.mark.parametrize("rate", [0.3, 0.7, 1.0])
def test_rates_and_no_row_loses_both(rate):
    def tol(p):  # 4 binomial standard deviations
        return 4 * np.sqrt(p * (1 - p) / N) + 1e-9

    both = apply_missing(IDS, ALL, rate, "both", seed=0)
    lost_image, lost_text = ~both["image"], ~both["text"]
    assert not np.any(lost_image & lost_text)
    assert abs(lost_image.mean() - rate / 2) < tol(rate / 2)
    assert abs(lost_text.mean() - rate / 2) < tol(rate / 2)
    for kind, other in (("image", "text"), ("text", "image")):
        kept = apply_missing(IDS, ALL, rate, kind, seed=0)
        assert abs((~kept[kind]).mean() - rate) < tol(rate)
        assert kept[other].all()


def test_scenarios_and_zero_rate():
    assert all(v.all() for v in scenario_present(IDS, ALL, "full", 0.7, 0).values())
    assert all(v.all() for v in apply_missing(IDS, ALL, 0.0, "both", 0).values())
    assert len(SCENARIOS) == 4
    image = scenario_present(IDS, ALL, "missing-image", 0.7, 0)
    assert image["text"].all() and abs((~image["image"]).mean() - 0.7) < 0.02
    with pytest.raises(ValueError):
        scenario_present(IDS, ALL, "missing-audio", 0.7, 0)
    with pytest.raises(ValueError):
        drop_masks(IDS, 1.5, "both", 0)


def test_applied_on_top_of_the_data_never_removing_the_last_modality():
    rng = np.random.default_rng(1)
    present = {"image": rng.random(N) > 0.2, "text": rng.random(N) > 0.2}
    present["text"] |= ~present["image"]  # every row has at least one modality in the data
    for kind in ("both", "image", "text"):
        after = apply_missing(IDS, present, 0.7, kind, seed=0)
        for m in after:
            assert not np.any(after[m] & ~present[m])  # nothing absent comes back
        assert np.all(after["image"] | after["text"])  # no row left with nothing
