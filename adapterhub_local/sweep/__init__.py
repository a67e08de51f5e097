"""Rank sweeps and rank comparison: plan a sweep over LoRA ranks, train it (one run per rank, or all ranks
at once on one shared frozen base), report it, and analyse the resulting updates (spectra, effective rank,
subspace similarity, SVD truncation)."""
