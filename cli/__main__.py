"""`python -m embcache.cli ...` (what torchrun launches)."""
from embcache.cli.main import main

main()
