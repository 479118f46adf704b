"""ginger-hf: the Ginger second-order optimizer for the Hugging Face stack."""

from .curvature import add_sampled_label_curvature, sample_labels, sampled_label_loss, unwrap_ginger
from .optimizer import Ginger, add_curvature, clear_curvature, get_curvature, set_curvature, state_bytes
from .distributed import sync_curvature
from .trainer import register

register()  # `--optim ginger` for transformers' Trainer; idempotent

__version__ = "0.1.0"

__all__ = [
    "Ginger",
    "add_sampled_label_curvature",
    "sample_labels",
    "sampled_label_loss",
    "unwrap_ginger",
    "add_curvature",
    "clear_curvature",
    "get_curvature",
    "set_curvature",
    "state_bytes",
    "sync_curvature",
    "register",
]
