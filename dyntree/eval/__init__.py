"""Evaluation: what a decoding method is worth beside its speed, measured apart from the decoding code.

quality.py   BLEU against plain decoding, the first-tree-token KL, and `dyntree quality`'s comparison
bench_kl.py  that KL as the `kl*` fields of `dyntree bench`'s sampling methods
replay.py    accepted tokens per pass of any tree policy, replayed on recorded greedy continuations
"""
