"""ginger-hf: the Ginger second-order optimizer for the Hugging Face stack."""

from .curvature import add_sampled_label_curvature, sample_labels, sampled_label_loss
from .optimizer import PRESETS, Ginger, state_bytes, unwrap_ginger
from .pending import add_curvature, clear_curvature, get_curvature, set_curvature
from .distributed import sync_curvature
from .registration import install as _install_registration
from .registration import register

_install_registration()  # `--optim ginger` once transformers loads; never imports it here

__version__ = "0.1.0"

__all__ = [
    "Ginger",
    "PRESETS",
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
