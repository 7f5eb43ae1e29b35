"""The training engine: knows nothing of tasks (see ``trainer.fit``)."""
from .checkpoint import atomic_save, checkpoint_path, load_checkpoint
from .distributed import barrier, cleanup, init_distributed, is_main
from .trainer import FitResult, NonFiniteLossError, fit, lr_factor

__all__ = ["FitResult", "NonFiniteLossError", "fit", "lr_factor", "atomic_save", "checkpoint_path",
           "load_checkpoint", "init_distributed", "is_main", "barrier", "cleanup"]
