"""Load benchmarks. Nothing in centime imports this package."""
