"""Shared pieces of the PEFT integration: names, which adapters and models it runs, call helpers."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any, Callable

import torch

from .. import _registry
from .._models import architecture_of, core_of, is_seq2seq_core

#: Registry owner of PEFT's wrapped methods.
OWNER = "peft"
#: Environment variable: "0" / "false" / "no" / "off" keeps PEFT's own behaviour
#: (unless ``bpp.apply(peft=True)`` says otherwise).
ENV_VAR = "BART_PREFIX_PATCH_PEFT"
#: Key added to ``adapter_config.json`` by adapters saved with the integration.
CONFIG_KEY = "bart_prefix_patch"
FULL, LEGACY = "full", "legacy"
SEMANTICS = (FULL, LEGACY)

SEMANTICS_ATTR = "_bpp_semantics"  # on a PeftConfig: FULL, LEGACY or absent (a fresh config: FULL)


class PeftIntegrationWarning(UserWarning):
    """What the PEFT integration changed, or how it runs a legacy checkpoint."""


def is_installed() -> bool:
    """Whether PEFT's methods are currently wrapped."""
    return bool(_registry.installed(OWNER))


def prefix_tuning(config: Any) -> bool:
    """Whether a PEFT config is a PREFIX_TUNING adapter."""
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) == "PREFIX_TUNING"


def seq2seq_core(peft_model: Any) -> Any:
    """The supported encoder-decoder core inside a PeftModel's base model, or None."""
    base = peft_model.get_base_model()
    if architecture_of(base) is None:
        return None
    core = core_of(base)
    return core if is_seq2seq_core(core) else None


def semantics_of(config: Any) -> str:
    """FULL unless the adapter's config says LEGACY."""
    return LEGACY if getattr(config, SEMANTICS_ATTR, None) == LEGACY else FULL


def bind(function: Callable, instance: Any, args: tuple, kwargs: dict) -> dict:
    """Call arguments by name; the function's ``**kwargs`` are merged in."""
    signature = inspect.signature(function)
    bound = signature.bind(instance, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            raise TypeError(f"{function.__qualname__}: unexpected positional arguments {arguments[name]!r}")
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            arguments.pop(name, None)
    return arguments


_INTERNAL = tuple(
    os.path.dirname(path) + os.sep
    for path in (__file__, torch.__file__, contextlib.__file__)
) + ("<frozen",)

def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package, torch, peft and transformers."""
    internal = list(_INTERNAL)
    for name in ("peft", "transformers"):
        module = sys.modules.get(name)
        if getattr(module, "__file__", None):
            internal.append(os.path.dirname(module.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(tuple(internal)):
        frame, level = frame.f_back, level + 1
    return level
