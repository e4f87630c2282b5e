"""Benchmarks of the reference datapath: figures printed as ratios against baselines measured in the
same run (a plain memcpy of the same bytes, and the same ring walk written in pure Python)."""
