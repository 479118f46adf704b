"""``--optim ginger``: registration with transformers, lazily and without breaking the import.

transformers picks optimizers from a closed ``str`` enum (``training_args.OptimizerNames``)
and a private handler table (``trainer_optimizer._OPTIMIZER_HANDLERS``), and builds default
callbacks from ``trainer.DEFAULT_CALLBACKS``. Registration adds a ``GINGER = "ginger"``
member, a handler (``ginger_hf.trainer.ginger_handler``) and Ginger's callbacks there, so
``TrainingArguments(optim="ginger")`` and ``--optim ginger`` work with the stock Trainer.

``import ginger_hf`` imports no transformers module. ``install()`` (run by the import)
registers each piece when transformers loads the module that holds it, or at once if it is
already loaded. If transformers' internals have changed, the piece is skipped with a
warning that names the reason; using ``--optim ginger`` then fails, and
``ginger_hf.register()`` raises the reason. Plain ``ginger_hf.Ginger`` never depends on any
of this.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["OPTIM_NAME", "register", "install"]

OPTIM_NAME = "ginger"
_failures: dict[str, str] = {}


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to an existing ``str`` enum (idempotent); what ``aenum.extend_enum`` does."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses new members
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _enum_member(training_args) -> enum.Enum:
    names = getattr(training_args, "OptimizerNames", None)
    if not (isinstance(names, type) and issubclass(names, str) and issubclass(names, enum.Enum)):
        raise RuntimeError("training_args.OptimizerNames is not a str Enum")
    member = _add_enum_member(names, OPTIM_NAME.upper(), OPTIM_NAME)
    if names(OPTIM_NAME) is not member or member not in list(names):
        raise RuntimeError("adding a member to OptimizerNames did not take effect")
    return member


def _register_name(module) -> None:
    _enum_member(module)


def _register_handler(module) -> None:
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
    context = getattr(module, "OptimizerContext", None)
    if not isinstance(handlers, dict):
        raise RuntimeError("trainer_optimizer._OPTIMIZER_HANDLERS is not a dict")
    fields = {f.name for f in dataclasses.fields(context)} if dataclasses.is_dataclass(context) else set()
    if not {"args", "model", "optimizer_kwargs", "optim_args"} <= fields:
        raise RuntimeError("trainer_optimizer.OptimizerContext lacks args/model/optimizer_kwargs/optim_args")
    from transformers import training_args

    from .trainer import ginger_handler

    handlers[_enum_member(training_args)] = ginger_handler


def _register_callbacks(module) -> None:
    callbacks = getattr(module, "DEFAULT_CALLBACKS", None)
    if not isinstance(callbacks, list):
        raise RuntimeError("transformers.trainer.DEFAULT_CALLBACKS is not a list")
    from .stats import GingerStatsCallback
    from .trainer import GingerAmpCallback

    for cb in (GingerStatsCallback, GingerAmpCallback):
        if cb not in callbacks:
            callbacks.append(cb)


# module whose loading triggers a piece -> the piece
_PIECES = {
    "transformers.training_args": _register_name,
    "transformers.trainer_optimizer": _register_handler,
    "transformers.trainer": _register_callbacks,
}


def _apply(name: str, module, *, strict: bool) -> None:
    try:
        _PIECES[name](module)
        _failures.pop(name, None)
    except Exception as exc:  # transformers changed: keep the import working, fail where it is used
        reason = f"{name}: {exc}"
        if strict:
            raise _unsupported(reason) from exc
        if name not in _failures:
            warnings.warn(f"ginger_hf could not register --optim ginger ({reason}); ginger_hf.Ginger still works, "
                          "--optim ginger will not.", stacklevel=2)
        _failures[name] = reason


def _unsupported(reason: str) -> RuntimeError:
    try:
        import transformers

        version = transformers.__version__
    except Exception:  # pragma: no cover - transformers itself broken
        version = "(not importable)"
    return RuntimeError(
        f"ginger_hf cannot register --optim ginger with transformers {version}: {reason}. It is tested with "
        "transformers 5.20-5.25. Meanwhile, pass the optimizer yourself: "
        "Trainer(..., optimizers=(ginger_hf.Ginger(model.parameters(), lr=...), None))."
    )


def register() -> None:
    """Register ``--optim ginger`` now (imports transformers' Trainer). Idempotent; raises with the reason."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("--optim ginger needs transformers, accelerate and peft: pip install 'ginger-hf[hf]' "
                          "(ginger_hf.Ginger itself needs torch only)")
    for name in _PIECES:
        _apply(name, importlib.import_module(name), strict=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a piece right after transformers executes the module that holds it."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PIECES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _apply(module.__name__, module, strict=False)


def install() -> None:
    """Register the pieces whose modules are loaded, and the rest when transformers loads them."""
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name in _PIECES:
        module = sys.modules.get(name)
        if module is not None:
            _apply(name, module, strict=False)
