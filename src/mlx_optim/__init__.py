"""mlx-optim: PyTorch's optimizer family for MLX, step for step identical to torch.optim."""

from . import schedulers as lr_scheduler
from . import checkpoint, grad_utils, swa_utils
from ._base import Optimizer, ParamGroup, get_cpu_streams, set_cpu_streams
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .checkpoint import load_torch_state_dict, to_torch_state_dict
from .grad_utils import GradientAccumulator, SkipNonFinite, clip_grad_norm, clip_grad_value
from .lbfgs import LBFGS
from .mixed_precision import MasterWeights
from .minimize import OptimizeResult, minimize
from .muon import Muon, muon_with_adamw
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedulers import (
    ChainedScheduler, ConstantLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR,
    ExponentialLR, LambdaLR, LinearLR, MultiplicativeLR, MultiStepLR, OneCycleLR, PolynomialLR,
    ReduceLROnPlateau, Schedule, SequentialLR, StepLR,
)
from .sgd import SGD
from .sparse import RowSparseGrad, embedding_value_and_grad
from .sparse_adam import SparseAdam
from .swa_utils import SWALR, AveragedModel

__all__ = [
    "Optimizer", "ParamGroup", "get_cpu_streams", "set_cpu_streams",
    "SGD", "Adam", "AdamW", "Adamax", "RMSprop", "NAdam", "RAdam", "Adagrad", "Adadelta",
    "ASGD", "Rprop", "LBFGS", "minimize", "OptimizeResult",
    "Adafactor", "Muon", "muon_with_adamw", "SparseAdam", "RowSparseGrad", "embedding_value_and_grad",
    "lr_scheduler", "swa_utils", "Schedule", "LambdaLR", "MultiplicativeLR", "StepLR",
    "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "SequentialLR", "CosineAnnealingLR",
    "ChainedScheduler", "ReduceLROnPlateau", "CyclicLR", "CosineAnnealingWarmRestarts",
    "OneCycleLR", "PolynomialLR", "AveragedModel", "SWALR",
    "checkpoint", "load_torch_state_dict", "to_torch_state_dict",
    "grad_utils", "clip_grad_norm", "clip_grad_value", "GradientAccumulator", "SkipNonFinite",
    "MasterWeights",
]
