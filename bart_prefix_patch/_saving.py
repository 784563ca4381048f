"""Where an attached prefix lives on disk: next to the model's weights, never inside them.

An attached :class:`PrefixEncoder` is a submodule of the model
(``model.bpp_prefix``), so it takes part in training like any other module:
``parameters()``, ``.to()``, ``state_dict()``, DDP, the Trainer's optimizer.
Only ``save_pretrained`` treats it differently. Its entry guard
(:func:`entry_save_pretrained`, installed on ``BartPreTrainedModel`` with the
other guards) leaves the ``bpp_prefix.*`` keys out of the model's weight
files and writes the prefix beside them with :func:`save_prefix`
(``prefix_config.json`` + ``prefix_model.safetensors``). The weight files are
therefore those of the unmodified base model: ``from_pretrained`` loads them
without the plugin and without an "unexpected keys" report.

:func:`restore_prefix` is the way back for an already attached encoder (the
Trainer hooks in :mod:`bart_prefix_patch.trainer` call it when resuming).
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import _patcher, _registry
from ._architectures import ARCHITECTURES
from ._constants import ATTACHED_NAME
from ._guards import method_wrapper
from ._models import modeling_module
from .encoder import PrefixEncoder
from .errors import PrefixError
from .io import CONFIG_NAME, WEIGHTS_NAME, load_into, save_prefix

_IGNORE_ATTR = "_keys_to_ignore_on_save"


def unwrap(model: Any) -> Any:
    """The model inside DDP / accelerate / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        modules = model.__dict__.get("_modules", {})
        inner = modules.get("_orig_mod", modules.get("module"))
        if inner is None:
            break
        model = inner
    return model


def attached_module(model: Any) -> Optional[torch.nn.Module]:
    """The prefix module registered on ``model`` (after unwrapping), if any."""
    modules = getattr(unwrap(model), "_modules", None)
    return modules.get(ATTACHED_NAME) if modules else None


def prefix_keys(model: torch.nn.Module) -> set[str]:
    """The ``state_dict`` keys of the attached prefix module, as the model names them."""
    module = attached_module(model)
    if module is None:
        return set()
    return {f"{ATTACHED_NAME}.{name}" for name in module.state_dict()}


class ignored_on_save:
    """Context manager: ``model._keys_to_ignore_on_save`` temporarily includes ``keys``.

    ``save_pretrained`` drops exactly these keys from whatever state dict it
    writes (its own or one passed in), on every transformers release; the
    Trainer also treats them as expected when they are missing on resume.
    """

    def __init__(self, model: torch.nn.Module, keys: set[str]):
        self.model, self.keys = model, keys

    def __enter__(self):
        self.had_own = _IGNORE_ATTR in self.model.__dict__
        self.previous = self.model.__dict__.get(_IGNORE_ATTR)
        current = getattr(self.model, _IGNORE_ATTR, None)
        self.model.__dict__[_IGNORE_ATTR] = set(current or ()) | self.keys
        return self

    def __exit__(self, *exc):
        if self.had_own:
            self.model.__dict__[_IGNORE_ATTR] = self.previous
        else:
            self.model.__dict__.pop(_IGNORE_ATTR, None)
        return False


def _argument(wrapped: Callable, args: tuple, kwargs: dict, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    try:
        names = [p for p in inspect.signature(wrapped).parameters]
    except (TypeError, ValueError):
        return default
    if name in names and names.index(name) < len(args):
        return args[names.index(name)]
    return default


def entry_save_pretrained(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``save_pretrained`` of a model with an attached prefix module.

    The weights written are the base model's only; a :class:`PrefixEncoder`
    is written beside them (on the main process). Another kind of attached
    module is left out with a warning (its format is not ours to choose).
    """
    module = instance._modules.get(ATTACHED_NAME)
    if module is None:
        return wrapped(*args, **kwargs)
    with ignored_on_save(instance, prefix_keys(instance)):
        result = wrapped(*args, **kwargs)
    directory = _argument(wrapped, args, kwargs, "save_directory", None)
    if not _argument(wrapped, args, kwargs, "is_main_process", True) or directory is None:
        return result
    if os.path.isfile(directory):
        return result  # save_pretrained logged the error and wrote nothing
    if isinstance(module, PrefixEncoder):
        save_prefix(module, directory)
    else:
        warnings.warn(
            f"save_pretrained: the attached prefix module ({type(module).__name__}) is not a PrefixEncoder; "
            "it was left out of the saved weights and not saved (save its state_dict yourself)",
            RuntimeWarning,
            stacklevel=3,
        )
    return result


def has_saved_prefix(directory: Union[str, os.PathLike]) -> bool:
    """Whether ``directory`` holds a prefix written by :func:`save_prefix`."""
    path = Path(directory)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def restore_prefix(model: torch.nn.Module, directory: Union[str, os.PathLike]) -> bool:
    """Copy a saved prefix into the :class:`PrefixEncoder` attached to ``model``, in place.

    In place, so an optimizer holding the encoder's parameters keeps working
    (the Trainer builds its optimizer before it resumes).

    Returns:
        True if a prefix was restored; False if ``model`` has no attached
        PrefixEncoder or ``directory`` holds no saved prefix.

    Raises:
        PrefixError: The saved files are damaged (the message names the file
            and the problem), or the saved prefix has another shape (model
            dimensions, sites, lengths or MLP width) than the attached one.
            The attached encoder is then unchanged.
    """
    module = attached_module(model)
    if not isinstance(module, PrefixEncoder) or not has_saved_prefix(directory):
        return False
    load_into(module, directory)
    return True


def _install_save_guards(applied: bool, options: dict) -> None:
    """Guard ``save_pretrained`` of every supported family (permanent, like the entry guards)."""
    for row in ARCHITECTURES.values():
        base = getattr(modeling_module(row), row.pretrained_class)
        _registry.install("saving", base, "save_pretrained", method_wrapper(entry_save_pretrained), permanent=True)


_patcher.register_integration("saving", on_apply=_install_save_guards)
