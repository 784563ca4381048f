"""Training integration: Hugging Face ``Trainer`` checkpoints and loading a prefix-tuned model.

Where the prefix lives (docs/training.md):

* **In memory** it is a submodule of the model, ``model.bpp_prefix``: it is in
  ``parameters()`` and ``state_dict()``, moves with ``.to()``, is broadcast and
  all-reduced by DDP, and the Trainer's optimizer picks up its parameters (the
  only ones with ``requires_grad`` after :func:`add_prefix_tuning`).
* **On disk** it is next to the weights, never inside them: ``save_pretrained``
  (and therefore every Trainer checkpoint) writes the base model's weights
  only, plus ``prefix_config.json`` and ``prefix_model.safetensors``. The
  folder loads into the unmodified model without the plugin.
* **Resuming**: the Trainer reloads ``model.safetensors`` into the model
  (prefix keys missing, by design); :func:`install_trainer_hooks` makes it
  then copy the saved prefix into the attached encoder, in place, when
  resuming and for ``load_best_model_at_end``. The hooks are installed as soon
  as ``transformers.trainer`` is imported while the patch is applied (a
  post-import hook registered with the patcher's integration hooks), and
  removed by :func:`bart_prefix_patch.revert`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import warnings
from typing import Any, Callable, Optional, Union

import torch
import wrapt

from . import _patcher, _registry
from ._attach import attach
from ._saving import attached_module, has_saved_prefix, prefix_keys, restore_prefix
from .io import WEIGHTS_NAME, load_prefix
from .tuning import declare_mean_loss

__all__ = ["install_trainer_hooks", "load_prefix_tuned", "prepare_for_training", "restore_prefix"]

_OWNER = "trainer"
#: Says where a restored prefix came from (INFO, like the Trainer's own "Loading model from ...").
logger = logging.getLogger(__name__)


def _resume_hook(original: Callable) -> Callable:
    """``Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`` that restores the prefix."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _load_from_checkpoint(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        directory = bound.arguments.get("resume_from_checkpoint")
        model = bound.arguments.get("model")
        model = self.model if model is None else model
        if directory is None or attached_module(model) is None or not has_saved_prefix(directory):
            if directory is not None and attached_module(model) is not None:
                warnings.warn(
                    f"resuming from {directory}: no saved prefix there (prefix_model.safetensors); "
                    "the attached prefix keeps its current values unless the weights file holds it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return original(self, *args, **kwargs)
        with _prefix_keys_expected(self, prefix_keys(model)):
            result = original(self, *args, **kwargs)
        restore_prefix(model, directory)
        _log_restored(model, directory, "resuming")
        return result

    return _load_from_checkpoint


def _best_model_hook(original: Callable) -> Callable:
    """``Trainer._load_best_model()`` that also restores the best checkpoint's prefix."""

    @functools.wraps(original)
    def _load_best_model(self, *args, **kwargs):
        directory = getattr(self.state, "best_model_checkpoint", None)
        model = self.model
        if directory is None or attached_module(model) is None or not has_saved_prefix(directory):
            return original(self, *args, **kwargs)
        with _prefix_keys_expected(self, prefix_keys(model)):
            result = original(self, *args, **kwargs)
        restore_prefix(model, directory)
        _log_restored(model, directory, "loading the best model")
        return result

    return _load_best_model


class _prefix_keys_expected:
    """Context manager: the Trainer's missing-key report leaves out the attached prefix's keys.

    ``model.safetensors`` never holds the ``bpp_prefix.*`` keys (they are saved
    beside it and restored right after the stock load), so reporting them as
    missing is false. Stock ``Trainer._issue_warnings_after_load`` stays
    silent only when the missing keys *equal* ``_keys_to_ignore_on_save``; on
    BART they never do, because the three tied embedding keys
    (``model.encoder.embed_tokens.weight``, ``model.decoder.embed_tokens.weight``,
    ``lm_head.weight``) are missing from every checkpoint too (transformers
    issue 29128; 4.57 and 5.x alike), so marking the prefix keys as ignored
    was not enough. This wraps the report on the Trainer instance, for the
    duration of the load only, and hands stock code the load result without
    the prefix keys: it then says exactly what it says without the plugin.
    """

    _NAME = "_issue_warnings_after_load"

    def __init__(self, trainer: Any, keys: set[str]):
        self.trainer, self.keys = trainer, keys

    def __enter__(self):
        own = self.trainer.__dict__
        self.had_own, self.previous = self._NAME in own, own.get(self._NAME)
        report = getattr(self.trainer, self._NAME, None)
        if report is None:  # pragma: no cover - a release without the report: nothing to filter
            return self
        keys = self.keys

        def without_prefix_keys(load_result: Any, *args, **kwargs):
            missing = getattr(load_result, "missing_keys", None)
            if missing and hasattr(load_result, "_replace"):
                # "module." / "_orig_mod." in front when the Trainer loads into a wrapped model.
                kept = [key for key in missing if not any(key == k or key.endswith("." + k) for k in keys)]
                load_result = load_result._replace(missing_keys=kept)
            return report(load_result, *args, **kwargs)

        own[self._NAME] = without_prefix_keys
        return self

    def __exit__(self, *exc):
        own = self.trainer.__dict__
        if self.had_own:
            own[self._NAME] = self.previous
        else:
            own.pop(self._NAME, None)
        return False


def _log_restored(model: Any, directory: Any, when: str) -> None:
    logger.info(
        "%s: restored the attached prefix (%d tensors, bpp_prefix.*) from %s; the checkpoint's model weights "
        "hold the base model only, by design (docs/training.md)",
        when, len(prefix_keys(model)), os.path.join(os.fspath(directory), WEIGHTS_NAME),
    )


_HOOKS = {"_load_from_checkpoint": _resume_hook, "_load_best_model": _best_model_hook}


def install_trainer_hooks() -> bool:
    """Make ``transformers.Trainer`` restore an attached prefix from its checkpoints (idempotent).

    Wraps the Trainer's checkpoint loading (resume and ``load_best_model_at_end``):
    after the stock code reloads the base weights, the prefix saved next to
    them is copied into the attached :class:`PrefixEncoder`. Models without
    an attached prefix are untouched. Called by :func:`add_prefix_tuning`.

    Returns:
        True if the hooks are installed; False if ``transformers.Trainer``
        cannot be imported or lacks the methods (a warning says so).
    """
    try:
        from transformers import trainer as trainer_module
    except Exception as error:  # pragma: no cover - a broken optional dependency of the Trainer
        warnings.warn(f"transformers.Trainer unavailable ({error}); prefix resume hooks not installed", RuntimeWarning)
        return False
    owner = trainer_module.Trainer
    with _registry.LOCK:
        missing = [name for name in _HOOKS if not callable(owner.__dict__.get(name))]
        if missing:  # pragma: no cover - a transformers release that renamed them
            warnings.warn(
                f"transformers.Trainer has no {', '.join(missing)}: a resumed Trainer will not restore the prefix "
                "(call bart_prefix_patch.trainer.restore_prefix(model, checkpoint_dir) yourself)",
                RuntimeWarning,
            )
            return False
        for name, make in _HOOKS.items():
            _registry.install(_OWNER, owner, name, make)
    return True


def prepare_for_training(model: torch.nn.Module) -> None:
    """What :func:`add_prefix_tuning` does for the Hugging Face Trainer.

    * Installs :func:`install_trainer_hooks` (a resumed Trainer restores the
      prefix; with the patch applied they are installed anyway).
    * :func:`bart_prefix_patch.tuning.declare_mean_loss`: sets
      ``model.accepts_loss_kwargs = False`` so the Trainer scales the loss
      correctly under gradient accumulation and data parallelism.
    """
    install_trainer_hooks()
    declare_mean_loss(model)


def load_prefix_tuned(
    directory: Union[str, os.PathLike],
    model_class: Optional[type] = None,
    prefix_directory: Optional[Union[str, os.PathLike]] = None,
    **from_pretrained_kwargs,
) -> torch.nn.Module:
    """``from_pretrained`` plus the prefix saved beside it, attached.

    Args:
        directory: A folder written by ``save_pretrained`` (or a Trainer checkpoint).
        model_class: Defaults to ``AutoModelForSeq2SeqLM`` (the checkpoint's own head).
        prefix_directory: Where the prefix is, if not in ``directory``.
        **from_pretrained_kwargs: Passed to ``from_pretrained``.

    Returns:
        The model (eval mode) with the prefix attached; without a saved prefix,
        a ``PrefixError``.
    """
    if model_class is None:
        from transformers import AutoModelForSeq2SeqLM as model_class
    model = model_class.from_pretrained(directory, **from_pretrained_kwargs)
    attach(model, load_prefix(prefix_directory if prefix_directory is not None else directory, model=model))
    return model.eval()


def _on_trainer_import(_module: Any) -> None:
    if _registry.is_applied():
        install_trainer_hooks()


_HOOK_REGISTERED = False


def _on_apply(applied: bool, options: dict) -> None:
    """Whenever ``transformers.trainer`` is imported (now, if it already is), its checkpoint loading learns to restore an attached prefix."""
    global _HOOK_REGISTERED
    if not applied:
        return
    if not _HOOK_REGISTERED:
        _HOOK_REGISTERED = True
        wrapt.register_post_import_hook(_on_trainer_import, "transformers.trainer")  # calls at once if imported
    elif "transformers.trainer" in sys.modules:
        install_trainer_hooks()


_patcher.register_integration(_OWNER, on_apply=_on_apply)
