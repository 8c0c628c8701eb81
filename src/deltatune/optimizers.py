"""peft's `peft.optimizers` import path: `from deltatune.optimizers import create_loraplus_optimizer`."""

from deltatune.train.optim import adapter_param_groups, create_loraplus_optimizer

__all__ = ["adapter_param_groups", "create_loraplus_optimizer"]
