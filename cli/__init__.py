"""The command line: `embcache ...` (main.py, a lazy click group), one module per command."""
