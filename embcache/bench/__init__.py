"""Benchmarks (`embcache bench ...`) and the synthetic caches they and the tests train on; no stage imports them."""
