"""Attaching a prefix (or a module producing one) to a model for all its later calls."""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, Optional, Union

import torch

from ._architectures import ARCHITECTURES
from ._constants import ATTACHED_NAME
from ._models import architecture_of, core_of, is_seq2seq_core
from ._registry import is_applied, model_refusal, status_line
from .errors import PatchNotAppliedError, PrefixError
from .prefix import Prefix, validate_prefix

_ATTACHMENT_ATTR = "_bpp_attachment"

# Whether any model of this process has a prefix attached. torch.compile does not guard on a key
# appearing in a module's __dict__, so a graph compiled before attach() would keep running
# without the prefix; it does guard on this module global, and compiled code that finds it True
# leaves the graph for the entry guard (_guards._prefix_involved). Counted, with a finalizer for
# models collected while attached.
_ATTACHED_COUNT = 0
_ANY_ATTACHED = False
_COUNT_LOCK = threading.Lock()


def _count(delta: int) -> None:
    global _ATTACHED_COUNT, _ANY_ATTACHED
    with _COUNT_LOCK:
        _ATTACHED_COUNT += delta
        _ANY_ATTACHED = _ATTACHED_COUNT > 0


def any_attached() -> bool:
    """Whether some model has a prefix attached (readable inside ``torch.compile``)."""
    return _ANY_ATTACHED


class Attachment:
    """What :func:`attach` recorded for one model.

    Attributes:
        source: The attached :class:`Prefix` or prefix module.
        owner: Weak reference to the model it was attached to.
        core: Weak reference to that model's core (:func:`._models.core_of`).
        requires_grad: ``requires_grad`` of every base parameter (by name)
            before :func:`~bart_prefix_patch.add_prefix_tuning` first froze
            them, or None when nothing was frozen; :func:`detach` restores it.

    Copies and pickles of a model carry their own attachment: ``copy.deepcopy``
    and pickling rebuild the record around the copied model, core and prefix
    module (weak references and finalizers are never copied or pickled).
    """

    def __init__(
        self,
        source: Union[Prefix, torch.nn.Module],
        owner: torch.nn.Module,
        core: Any,
        requires_grad: Optional[dict[str, bool]] = None,
    ):
        self.source = source
        self.owner = weakref.ref(owner)
        self.core = weakref.ref(core)
        self.requires_grad = requires_grad
        _count(1)
        # Uncounted when detached, or when the model is collected while attached.
        self._finalizer = weakref.finalize(owner, _count, -1)

    def release(self) -> None:
        """Uncount this attachment (detach)."""
        self._finalizer()

    def __deepcopy__(self, memo: dict) -> "Attachment":
        # The model, its core and an attached module are being copied with this record (memo).
        owner, core = copy.deepcopy(self.owner(), memo), copy.deepcopy(self.core(), memo)
        return Attachment(copy.deepcopy(self.source, memo), owner, core, dict(self.requires_grad or {}) or None)

    def __reduce__(self):
        return Attachment, (self.source, self.owner(), self.core(), self.requires_grad)


def attachment_of(module: Any) -> Optional[Attachment]:
    """The attachment recorded on ``module``, if any."""
    # A plain instance attribute (not a registry): cheap, and readable inside torch.compile.
    return module.__dict__.get(_ATTACHMENT_ATTR)


def call_source(module: torch.nn.Module) -> Prefix:
    """Call a prefix module and check that it returned a :class:`Prefix`."""
    prefix = module()
    if not isinstance(prefix, Prefix):
        raise PrefixError(
            f"the prefix module {type(module).__name__} must return a bart_prefix_patch.Prefix, "
            f"got {type(prefix).__name__}"
        )
    return prefix


def attach(
    model: torch.nn.Module,
    prefix_or_module: Union[Prefix, torch.nn.Module],
    *,
    _requires_grad: Optional[dict[str, bool]] = None,
) -> torch.nn.Module:
    """Make every later forward/generate of ``model`` use a prefix.

    Args:
        model: A supported encoder-decoder model (any head containing the bare
            model, e.g. ``BartForConditionalGeneration``, or the bare model).
        prefix_or_module: A :class:`Prefix`, or an ``nn.Module`` called with no
            arguments that returns one. A module is registered on the model as
            ``model.bpp_prefix`` (its parameters join ``model.parameters()``
            and follow ``.to()``) and is called once per forward and once per
            ``generate()``. ``attach`` never changes ``requires_grad``; a base
            frozen by :func:`~bart_prefix_patch.add_prefix_tuning` stays frozen
            when another prefix is attached.

    Returns:
        The same model.

    Raises:
        PatchNotAppliedError: The patch is not applied.
        PrefixError: Not a supported model, or the prefix does not fit it.
    """
    if not is_applied():
        raise PatchNotAppliedError(f"attach() needs the patch: {status_line()}")
    row = architecture_of(model)
    if row is not None and model_refusal(row.model_type):
        raise PatchNotAppliedError(f"attach() cannot prefix {type(model).__name__}: {model_refusal(row.model_type)}")
    core = core_of(model) if row is not None else None
    if not is_seq2seq_core(core):
        raise PrefixError(
            f"attach() expected a BART model or a supported relative with an encoder and a decoder "
            f"(model types: {', '.join(ARCHITECTURES)}; e.g. BartForConditionalGeneration), got {type(model).__name__}"
        )
    if not isinstance(prefix_or_module, (Prefix, torch.nn.Module)):
        raise PrefixError(
            f"attach() expected a Prefix or an nn.Module returning one, got {type(prefix_or_module).__name__}"
        )
    if isinstance(prefix_or_module, torch.nn.Module):
        with torch.no_grad():
            validate_prefix(call_source(prefix_or_module), core, None)
    else:
        validate_prefix(prefix_or_module, core, None)
    previous = attachment_of(model)
    if _requires_grad is None and previous is not None:
        _requires_grad = previous.requires_grad  # the base stays frozen; detach restores the first state
    _remove(model)
    if isinstance(prefix_or_module, torch.nn.Module):
        model.add_module(ATTACHED_NAME, prefix_or_module)
    record = Attachment(prefix_or_module, model, core, _requires_grad)
    for module in (model, core, core.encoder, core.decoder):
        module.__dict__[_ATTACHMENT_ATTR] = record
    return model


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Remove an attached prefix (and its module) from ``model``.

    Base parameters frozen by :func:`~bart_prefix_patch.add_prefix_tuning` get
    back the ``requires_grad`` they had before the first prefix.
    """
    record = _remove(model)
    if record is not None and record.requires_grad:
        for name, parameter in model.named_parameters():
            if name in record.requires_grad:
                parameter.requires_grad_(record.requires_grad[name])
    return model


def _remove(model: torch.nn.Module) -> Optional[Attachment]:
    """Take the attachment record and module off ``model`` (``requires_grad`` untouched)."""
    record = attachment_of(model)
    if record is not None:
        core = record.core()
        for module in (model, core, getattr(core, "encoder", None), getattr(core, "decoder", None)):
            if module is not None and module.__dict__.get(_ATTACHMENT_ATTR) is record:
                del module.__dict__[_ATTACHMENT_ATTR]
        record.release()
    if ATTACHED_NAME in model._modules:
        del model._modules[ATTACHED_NAME]
    return record


def attached(model: torch.nn.Module) -> Optional[Union[Prefix, torch.nn.Module]]:
    """The prefix or module attached to ``model``, if any."""
    record = attachment_of(model)
    return record.source if record else None
