"""peft's `peft.optimizers` import path: `from deltatune.optimizers import create_loraplus_optimizer`."""

from deltatune.train.optim import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
