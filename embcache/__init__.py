"""embcache: an embedded-feature cache and lightweight trainer for image+text classification with missing
modalities (after Kim & Kim, ECCV 2024).

Stages: `embcache.extract` (frozen encoders -> Zarr cache, docs/cache-format.md), then training on the cache.
"""
__version__ = "0.1.0"


def load(path: str, **kwargs):
    """Load an exported bundle: `embcache.load("model.embcache").predict(image=..., text=...)`."""
    from embcache.bundle import load as _load

    return _load(path, **kwargs)
