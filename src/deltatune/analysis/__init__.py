"""Analysis tools: gradient-sensitivity rank allocation."""

from deltatune.analysis.ranks import allocate_ranks, sensitivity_scores

__all__ = ["allocate_ranks", "sensitivity_scores"]
