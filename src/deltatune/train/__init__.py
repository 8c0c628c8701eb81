"""Training: one linear `train()` loop (setup -> loop -> eval -> save) driven by a validated `TrainConfig`."""

from deltatune.train.config import TrainConfig, load_train_config
from deltatune.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "train"]
