"""Which trainable parameters get Ginger, which get AdamW, and which LoRA pairs form one block.

``--optim_target_modules`` (transformers' own field) selects the modules whose parameters,
and those of their sub-modules, get Ginger. Each pattern (each list entry, or each
comma-separated part of the string) is a regex that must match the module's full name or a
dotted suffix of it, so ``"q,v"`` and ``"q|v"`` (what a command line can pass) and
``["q", "v"]`` all select modules named ``....q`` and ``....v``, as peft's ``target_modules``
does; ``"all-linear"`` means every ``nn.Linear``. (A comma inside ``{m,n}`` stays part of its regex.)
(transformers' GaLore matching treats list entries as substrings, so ``"v"``
would also hit ``...modules_to_save...``; suffix matching avoids that.) The other trainable
parameters get an AdamW update inside the same ``Ginger`` optimizer (``algorithm="adamw"`` groups).
Frozen parameters are never given to the optimizer, so they carry no state.

``lora_blocks="joint"`` makes the A and B matrices of each peft LoRA module (and adapter)
one Ginger block: ``lora_A.<adapter>`` / ``lora_B.<adapter>`` (or ``lora_embedding_A/B``)
under the same parent module share a block.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

__all__ = ["LORA_BLOCKS", "param_roles", "split_param_groups"]

LORA_BLOCKS = ("separate", "joint")

# "<parent>.lora_A.<adapter>[.weight]" and "<parent>.lora_embedding_B.<adapter>"
_LORA_PARAM = re.compile(r"^(?P<parent>.*)\.lora_(?:embedding_)?[AB]\.(?P<adapter>[^.]+)(?:\..*)?$")


SYNTAX = ("each pattern (a list entry, or a comma-separated part of the string: 'q,v' or 'q|v') is a regex "
          "matched against a module's full name or a dotted suffix of it; 'all-linear' selects every nn.Linear")


def _patterns(target_modules: str | list[str]) -> list[str]:
    """The regexes of ``target_modules``: list entries, or the string split at commas outside ``{m,n}``."""
    if not isinstance(target_modules, str):
        return list(target_modules)
    return [part for part in re.split(r",(?![^{]*\})", target_modules) if part]


def _targeted_names(model: nn.Module, target_modules: str | list[str]) -> set[str]:
    """Names of parameters inside a module that ``target_modules`` selects."""
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(
            f"optim_target_modules must be a list of module names, a regex string or 'all-linear', got {target_modules!r}"
        )
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    patterns = _patterns(target_modules)
    try:
        compiled = [re.compile(rf"(?:.*\.)?(?:{t})") for t in patterns]
    except re.error as e:
        raise ValueError(f"optim_target_modules: {target_modules!r} is not a valid regex ({e})") from None
    matches = lambda name: any(c.fullmatch(name) for c in compiled)  # noqa: E731
    selected = set()
    for module_name, module in model.named_modules():
        if not module_name:
            continue
        hit = isinstance(module, nn.Linear) if all_linear else matches(module_name)
        if hit:
            selected.update(f"{module_name}.{n}" for n, _ in module.named_parameters())
    return selected


def param_roles(
    model: nn.Module, target_modules: str | list[str] | None = None, lora_blocks: str = "separate"
) -> dict[int, tuple[str, str | None]]:
    """``id(param) -> (algorithm, joint_key)`` for every trainable parameter of ``model``.

    ``algorithm`` is ``"ginger"`` or ``"adamw"``; ``joint_key`` names the LoRA block a
    Ginger parameter shares with its partner when ``lora_blocks="joint"``, else ``None``.
    """
    if lora_blocks not in LORA_BLOCKS:
        raise ValueError(f"lora_blocks must be one of {LORA_BLOCKS}, got {lora_blocks!r}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    targeted = None if target_modules is None else _targeted_names(model, target_modules)
    if targeted is not None and not any(n in targeted for n, _ in trainable):
        raise ValueError(
            f"optim_target_modules={target_modules!r} selects no trainable parameter of {type(model).__name__}: "
            f"{SYNTAX}. Modules holding trainable parameters here: {_module_names(trainable)}"
        )
    roles = {}
    for name, p in trainable:
        algorithm = "ginger" if targeted is None or name in targeted else "adamw"
        key = None
        match = _LORA_PARAM.match(name)
        if lora_blocks == "joint" and algorithm == "ginger" and match:
            key = f"{match['parent']}:{match['adapter']}"
        roles[id(p)] = (algorithm, key)
    if lora_blocks == "joint" and not any(key for _, key in roles.values()):
        raise ValueError("lora_blocks=joint: the model has no trainable LoRA A/B matrices that Ginger optimizes")
    return roles


def _module_names(trainable: list[tuple[str, Tensor]], limit: int = 16) -> str:
    """The distinct dotted suffixes (last two names, layer numbers as ``*``) of modules owning trainable parameters."""
    def suffix(name: str) -> str:
        module = name.rsplit(".", 1)[0] if "." in name else "(the model itself)"
        return ".".join("*" if part.isdigit() else part for part in module.split(".")[-2:])

    names = list(dict.fromkeys(suffix(n) for n, _ in trainable))
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def split_param_groups(
    groups: list[dict[str, Any]] | list[Tensor], roles: dict[int, tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """Split each param group (e.g. the Trainer's decay / no-decay groups) by role.

    Keeps every other key of the group (``weight_decay``...); ``(name, tensor)`` params stay
    named. A parameter missing from ``roles`` gets Ginger. Empty groups are dropped.
    """
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out: list[dict[str, Any]] = []
    joint_home: dict[str, int] = {}
    for index, group in enumerate(groups):
        params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        ginger, adamw, joint = [], [], {}
        for item in params:
            p = item[1] if isinstance(item, tuple) else item
            algorithm, key = roles.get(id(p), ("ginger", None))
            if algorithm == "adamw":
                adamw.append(item)
            elif key is None:
                ginger.append(item)
            else:
                if joint_home.setdefault(key, index) != index:
                    raise ValueError(
                        f"lora_blocks=joint: the parameters of LoRA module {key!r} fall into different param groups "
                        "(e.g. different weight decay); they must share one group to form one block"
                    )
                joint.setdefault(key, []).append(item)
        if ginger:
            out.append({**group, "params": ginger})
        out.extend({**group, "params": ps, "joint": True} for ps in joint.values())
        if adamw:
            out.append({**group, "params": adamw, "algorithm": "adamw"})
    return out
