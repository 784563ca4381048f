"""Switching the PEFT integration on and off: PEFT's methods wrapped through the registry."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Any, Callable, Optional

import wrapt

from .. import _registry
from ._common import ENV_VAR, OWNER
from ._marker import _config_save_pretrained, _from_peft_type, _load_adapter, _model_save_pretrained
from ._positions import remove_shift_hooks
from ._wrappers import forward as _forward, generate as _generate

#: Oldest PEFT whose prefix-tuning internals (``prompt_encoder``, ``prompt_tokens``,
#: ``get_prompt`` layout) this integration was written and tested against.
MIN_PEFT = (0, 21)

_WANTED: Optional[bool] = None  # the last apply(peft=...) choice; None: the environment variable decides
_HOOK_REGISTERED = False
_VERSION_WARNED = False


def wanted() -> bool:
    """Whether the integration should be on (the last ``apply(peft=...)``, else the environment)."""
    if _WANTED is not None:
        return _WANTED
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")

def configure(peft: Optional[bool] = None) -> None:
    """Record a choice (``None`` keeps the current one) and install or remove the wrappers to match.

    Called by :func:`bart_prefix_patch.apply` and :func:`bart_prefix_patch.revert`.
    The wrappers are on exactly when the core patch is applied, the integration
    is wanted, and peft has been imported (the post-import hook installs them
    the moment it is).
    """
    global _WANTED, _HOOK_REGISTERED
    with _registry.LOCK:
        if peft is not None:
            _WANTED = bool(peft)
        if not _HOOK_REGISTERED:
            _HOOK_REGISTERED = True
            # Called at once when peft is already imported, else right after its import.
            wrapt.register_post_import_hook(_on_peft_import, "peft")
        _sync()

def _on_peft_import(module: Any) -> None:
    try:
        with _registry.LOCK:
            _sync()
    except Exception as error:  # never break `import peft`
        warnings.warn(
            f"bart_prefix_patch: the PEFT integration could not be installed ({type(error).__name__}: {error}); "
            "PEFT runs unchanged",
            RuntimeWarning,
            stacklevel=2,
        )

def _sync() -> None:
    if "peft" not in sys.modules or getattr(sys.modules["peft"], "__version__", None) is None:
        return  # not imported (or still importing): the post-import hook calls again
    if _registry.is_applied() and wanted():
        _install()
    else:
        _uninstall()

def _version_ok() -> bool:
    global _VERSION_WARNED
    import peft

    try:
        release = tuple(int(part) for part in peft.__version__.split(".")[:2])
    except ValueError:
        release = (0, 0)
    if release >= MIN_PEFT:
        return True
    if not _VERSION_WARNED:
        _VERSION_WARNED = True
        warnings.warn(
            f"bart_prefix_patch: peft {peft.__version__} is older than {'.'.join(map(str, MIN_PEFT))}; the PEFT "
            "integration is not installed and PEFT prefix-tuning of BART keeps its stock behaviour "
            "(pip install 'bart-prefix-patch[peft]')",
            RuntimeWarning,
            stacklevel=4,
        )
    return False

def _install() -> None:
    if not _version_ok():
        return
    from peft.config import PeftConfigMixin
    from peft.peft_model import PeftModel, PeftModelForSeq2SeqLM

    _wrap_method(PeftModelForSeq2SeqLM, "forward", _forward)
    _wrap_method(PeftModelForSeq2SeqLM, "generate", _generate)
    _wrap_method(PeftModel, "save_pretrained", _model_save_pretrained)
    _wrap_method(PeftModel, "load_adapter", _load_adapter)
    _wrap_method(PeftConfigMixin, "save_pretrained", _config_save_pretrained)
    _wrap_classmethod(PeftConfigMixin, "from_peft_type", _from_peft_type)



def _uninstall() -> None:
    _registry.uninstall(OWNER)
    remove_shift_hooks()


def _wrap_method(owner: type, attr: str, handler: Callable) -> None:
    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def patched(self, *args, **kwargs):
            return handler(original, self, args, kwargs)

        return patched

    _registry.install(OWNER, owner, attr, make)


def _wrap_classmethod(owner: type, attr: str, handler: Callable) -> None:
    def make(original: Any) -> Any:
        function = original.__func__

        @functools.wraps(function)
        def patched(cls, *args, **kwargs):
            return handler(function, cls, args, kwargs)

        return classmethod(patched)

    _registry.install(OWNER, owner, attr, make)
