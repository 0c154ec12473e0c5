"""Benchmarks of bam against its peers and limits: `python -m bench [--quick]` (see README.md)."""
