"""mlx-optim: PyTorch's optimizer family for MLX, step for step identical to torch.optim."""

from ._base import Optimizer, ParamGroup
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD

__all__ = [
    "Optimizer", "ParamGroup",
    "SGD", "Adam", "AdamW", "Adamax", "RMSprop", "NAdam", "RAdam", "Adagrad", "Adadelta",
    "ASGD", "Rprop",
]
