"""Benchmarks: ``python -m bench`` measures Tidegate against this machine's limits, with
every baseline measured in the same run. See the "Performance" section of README.md."""
