"""Data shipped with deltatune (the quickstart dataset)."""
