"""Evaluation: what a decoding method is worth beside its speed, measured apart from the decoding code.

quality.py      BLEU against plain decoding, and `dyntree quality`'s greedy / lossless / typical comparison
kl.py           the first-tree-token KL of a sampling method, next to its noise floor (docs/sampling.md)
bench_kl.py     that KL as the `kl*` fields of `dyntree bench`'s sampling methods
replay.py       accepted tokens per pass of any tree policy, replayed on recorded greedy continuations
calibration.py  `dyntree calibrate`: per-head acceptance statistics for calibrated dynamic trees
"""
