"""`python -m deltatune.cli ...` (what `torchrun -m deltatune.cli` runs)."""

from deltatune.cli import main

main()
