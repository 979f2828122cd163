"""`make bench`: Fluxgate against direct, nginx and a minimal pass-through (see BENCHMARKS.md)."""
