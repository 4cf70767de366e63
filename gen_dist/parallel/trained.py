"""Modules of which only some parameters are trained (a LoRA adapter on a frozen pretrained denoiser): the
optimizer, the EMA, the requires_grad switching and every checkpoint see those parameters alone, and the rest
comes from where the module was built (the pretrained weights)."""

from __future__ import annotations

from typing import Any

from torch import nn

TRAINED = "trained_parameters"
"""The attribute naming a module's trained parameters; absent: all of them are trained."""


def _names(module: nn.Module) -> frozenset[str] | None:
    return getattr(module, TRAINED, None)


def _frozen(module: nn.Module) -> set[str]:
    names = _names(module)
    return set() if names is None else {n for n, _ in module.named_parameters()} - names


def _drop_frozen(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name in _frozen(module):
        state.pop(prefix + name, None)


def _frozen_not_missing(module: nn.Module, incompatible: Any) -> None:
    frozen = _frozen(module)
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if k not in frozen and not any(k.endswith("." + f) for f in frozen)]


def train_only(module: nn.Module, names: set[str]) -> None:
    """Train only the parameters `names` of `module`: the others stop requiring gradients, its state dict holds
    `names` (and buffers) alone, and loading one needs no more (under every strategy's save and load, which go
    through the module's own state_dict and load_state_dict)."""
    unknown = names - {n for n, _ in module.named_parameters()}
    if unknown:
        raise ValueError(f"train_only: {sorted(unknown)[:5]} are not parameters of the module")
    setattr(module, TRAINED, frozenset(names))
    set_trainable(module, True)
    module.register_state_dict_post_hook(_drop_frozen)
    module.register_load_state_dict_post_hook(_frozen_not_missing)


def set_trainable(module: nn.Module, on: bool) -> None:
    """requires_grad of the trained parameters set to `on`; the frozen ones never require gradients."""
    names = _names(module)
    for n, p in module.named_parameters():
        p.requires_grad_(on and (names is None or n in names))


def trained_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    names = _names(module)
    return [(n, p) for n, p in module.named_parameters() if names is None or n in names]


def trained_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in trained_named_parameters(module)]


def is_partial(module: nn.Module) -> bool:
    """Whether some of the module's parameters are frozen (its checkpoints hold only the trained ones)."""
    return bool(_frozen(module))


def train_all(module: nn.Module) -> None:
    """Every parameter trained, and in the state dict, again (a copy of which the whole weights are wanted)."""
    if hasattr(module, TRAINED):
        delattr(module, TRAINED)
