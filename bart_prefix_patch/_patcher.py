"""Applying and reverting the patch; entry points of every prefixed call.

Two kinds of wrappers are installed (located and set with wrapt's
``resolve_path`` / ``apply_patch``; each keeps ``__wrapped__`` so signatures
stay introspectable, as ``generate()`` validates its kwargs against
``forward``):

* **Forks** (from the family's fork module), e.g. ``BartAttention.forward``.
  ``apply()`` installs them and ``revert()`` puts back the exact original
  objects, recorded in a registry of originals.
* **Entry guards** on the public entry points (``forward`` of every BART
  model class, encoder and decoder, and ``generate``). They are installed
  once, at import, and stay: when the patch is applied they resolve the
  call's prefix and publish it (:mod:`._state`); when it is not applied they
  pass every call through untouched, except one that carries a prefix, which
  raises :class:`PatchNotAppliedError` instead of being silently ignored
  (stock 5.x forwards swallow unknown keyword arguments).
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
import weakref
from typing import Any, Callable, Optional, Union

import torch
import wrapt

from . import _compat
from ._state import PrefixState, active_state, ensure_checkpoint_binding, run_with_state
from .errors import PatchNotAppliedError, PrefixError, UnsupportedConfigurationError, UnsupportedTransformersError
from .prefix import SITES, Prefix, attention_modules, validate_prefix

_LOCK = threading.RLock()
_ORIGINALS: dict[tuple[type, str], tuple[bool, Any]] = {}  # (owner, attr) -> (was in owner.__dict__, original)
_INSTALLED: dict[tuple[type, str], Any] = {}  # (owner, attr) -> the wrapper we installed
_GUARDS: dict[tuple[type, str], Any] = {}  # entry guards, installed once
_APPLIED = False
_GATE: Optional[_compat.GateResult] = None

_CACHE_NAMES = ("cache", "past_key_values")
_BATCH_NAMES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "inputs")
_ATTACHMENT_ATTR = "_bpp_attachment"
ATTACHED_NAME = "bpp_prefix"


# --------------------------------------------------------------------- apply


def _original_lookup(module_name: str, qualname: str) -> Any:
    """The upstream object behind one of our wrappers, for fingerprinting.

    None when the attribute is not currently our wrapper: then the live
    object (possibly somebody else's replacement) is what gets hashed.
    """
    owner_name, _, attr = qualname.rpartition(".")
    for key, (_, original) in _ORIGINALS.items():
        owner, name = key
        if name == attr and owner.__name__ == owner_name and owner.__module__ == module_name:
            current = owner.__dict__.get(attr)
            if current is not None and current in (_INSTALLED.get(key), _GUARDS.get(key)):
                return original
    return None


def apply(strict: bool = False, peft: Optional[bool] = None, unknown: Optional[str] = None) -> bool:
    """Patch transformers so BART attention honours prefixes.

    Args:
        strict: Raise instead of warning when the installed transformers is
            refused (not in the table, or its self-check failed).
        peft: The PEFT prefix-tuning integration (docs/peft.md): True or False
            records the choice; None keeps the last one (initially on, unless
            the environment variable ``BART_PREFIX_PATCH_PEFT=0``). It is only
            active while the patch is applied.
        unknown: What to do with a release whose fingerprints are in no table
            entry: ``"refuse"`` (leave it unpatched, with a warning) or
            ``"verify"`` (pick the fork by feature detection and patch only
            if the behavioural self-check passes; a warning says which).
            None: the environment variable ``BART_PREFIX_PATCH_UNKNOWN``,
            else ``"refuse"``.

    Returns:
        True when the patch is applied (also when it already was), False when
        the version gate refused the installed transformers (a warning says
        what was found and what is supported).

    Raises:
        UnsupportedTransformersError: With ``strict=True`` on a refused release.
        ValueError: ``unknown`` is neither ``"refuse"`` nor ``"verify"``.
    """
    if unknown not in (None, "refuse", "verify"):
        raise ValueError(f"unknown= must be 'refuse' or 'verify', got {unknown!r}")
    applied = _apply(strict, unknown)
    from . import _peft  # late: _peft imports this module

    _peft.configure(peft)
    return applied


def _apply(strict: bool, unknown: Optional[str] = None) -> bool:
    global _APPLIED, _GATE
    with _LOCK:
        _install_guards()
        if _APPLIED:
            return True
        _GATE = _compat.check(_original_lookup)
        if not _GATE.ok and not _GATE.in_table:
            # A release the table does not know: refused, or verified by behaviour (_verify.py).
            from . import _verify

            _GATE = _verify.unknown_release(_GATE, unknown, _install_fork, revert, _original_lookup)
        if not _GATE.ok:
            if strict:
                raise UnsupportedTransformersError(_GATE.message)
            warnings.warn(_GATE.message, RuntimeWarning, stacklevel=3)
            return False
        if _GATE.accepted_by == "self-check":
            warnings.warn(_GATE.message, RuntimeWarning, stacklevel=3)
        _install_fork(_GATE.fork)
        return True


def _install_fork(fork: Any) -> None:
    global _APPLIED
    if not _APPLIED:
        for owner, attr, wrapper in fork.patches():
            _wrap(owner, attr, wrapper, _INSTALLED)
        _APPLIED = True


def revert() -> None:
    """Undo :func:`apply`: every forked function is the exact original again.

    An attribute that somebody else replaced after us is left alone (their
    object is not ours to remove). The entry guards stay and keep refusing
    prefixes while the patch is not applied.
    """
    global _APPLIED
    with _LOCK:
        for key in list(_INSTALLED):
            _unwrap(key, _INSTALLED.pop(key))
        _APPLIED = False
        from . import _peft  # late: _peft imports this module

        _peft.configure()  # PEFT's own methods again


def is_applied() -> bool:
    """Whether the patch is currently applied."""
    return _APPLIED


def gate() -> Optional[_compat.GateResult]:
    """The last version-gate result (None before the first :func:`apply`)."""
    return _GATE


def status_line() -> str:
    """One sentence on the patch state, used in error messages."""
    if _APPLIED:
        return "bart_prefix_patch is applied."
    if _GATE is not None and not _GATE.ok:
        return _GATE.message
    return "bart_prefix_patch is not applied (bpp.revert() was called); call bpp.apply() first."


def _wrap(owner: type, attr: str, wrapper: Callable, registry: dict) -> None:
    key = (owner, attr)
    in_dict = attr in owner.__dict__
    # wrapt.resolve_path reads the class __dict__ (the function, never a bound method).
    original = wrapt.resolve_path(owner, attr)[2] if in_dict else getattr(owner, attr)
    # setdefault: a second apply never records one of our wrappers as original.
    _ORIGINALS.setdefault(key, (in_dict, original))
    installed = _method_wrapper(_ORIGINALS[key][1], wrapper)
    wrapt.apply_patch(owner, attr, installed)
    registry[key] = installed


def _method_wrapper(original: Callable, wrapper: Callable) -> Callable:
    """A plain function that calls ``wrapper(bound_original, self, args, kwargs)``.

    wrapt's calling convention, but a real function rather than a
    ``wrapt.FunctionWrapper`` object: TorchDynamo guards on the closures of
    the methods it traces and rejects proxy objects there, which broke
    ``torch.compile`` of every BART model, prefix or not. ``functools.wraps``
    keeps ``__wrapped__`` and therefore ``inspect.signature``, which
    ``generate()`` uses to validate its keyword arguments.
    """

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        if torch.compiler.is_compiling() and not _prefix_involved(self, kwargs):
            return original(self, *args, **kwargs)  # traced by torch.compile: exactly upstream
        return _eager(wrapper, original.__get__(self, type(self)), self, args, kwargs)

    return patched


def _prefix_involved(instance: Any, kwargs: dict) -> bool:
    return (
        "prefix" in kwargs
        or any(isinstance(kwargs.get(name), Prefix) for name in _CACHE_NAMES)
        or _attachment_of(instance) is not None
        or active_state() is not None
    )


@torch.compiler.disable
def _eager(wrapper: Callable, bound: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Run a wrapper (and everything below it) outside torch.compile.

    A prefixed call keeps its per-call state in a ContextVar, which a compiled
    graph would bake in; under torch.compile such a call therefore runs
    eagerly (correct, not faster), and calls without a prefix compile as in
    stock transformers. Outside torch.compile this decorator costs nothing.
    """
    return wrapper(bound, instance, args, kwargs)


def _unwrap(key: tuple[type, str], installed: Any) -> None:
    owner, attr = key
    if owner.__dict__.get(attr) is not installed:
        return
    in_dict, original = _ORIGINALS[key]
    if in_dict:
        setattr(owner, attr, original)
    else:
        delattr(owner, attr)


def get_original(owner: type, attr: str) -> Any:
    """The upstream object behind a patched or guarded attribute."""
    entry = _ORIGINALS.get((owner, attr))
    return entry[1] if entry else owner.__dict__.get(attr, getattr(owner, attr, None))


# ------------------------------------------------------------- entry guards


def _bart_classes() -> list[tuple[type, str, Callable]]:
    from transformers.models.bart import modeling_bart as mb

    entries = [
        (getattr(mb, name), "forward", _entry_forward)
        for name in (
            "BartForConditionalGeneration",
            "BartModel",
            "BartForSequenceClassification",
            "BartForQuestionAnswering",
            "BartEncoder",
            "BartDecoder",
        )
        if hasattr(mb, name)
    ]
    entries.append((mb.BartForConditionalGeneration, "generate", _entry_generate))
    # An attached prefix module is saved next to the weights, not in them (_saving.py, docs/training.md).
    from ._saving import entry_save_pretrained

    entries.append((mb.BartPreTrainedModel, "save_pretrained", entry_save_pretrained))
    return entries


def _install_guards() -> None:
    for owner, attr, wrapper in _bart_classes():
        if (owner, attr) not in _GUARDS:
            _wrap(owner, attr, wrapper, _GUARDS)


def _is_bart_model(module: Any) -> bool:
    from transformers.models.bart.modeling_bart import BartPreTrainedModel

    return isinstance(module, BartPreTrainedModel)


class _Stack:
    """A stand-in core for an encoder or decoder called on its own."""

    def __init__(self, module: torch.nn.Module, is_encoder: bool):
        self.config = module.config
        setattr(self, "encoder" if is_encoder else "decoder", module)


def _core_of(module: torch.nn.Module) -> Any:
    if hasattr(module, "encoder") and hasattr(module, "decoder"):
        return module
    inner = getattr(module, "model", None)
    if inner is not None and hasattr(inner, "encoder") and hasattr(inner, "decoder"):
        return inner
    if hasattr(module, "layers") and module.layers and hasattr(module.layers[0], "self_attn"):
        return _Stack(module, is_encoder=not hasattr(module.layers[0], "encoder_attn"))
    return None


class _Attachment:
    """What :func:`attach` recorded for one model."""

    def __init__(
        self,
        source: Union[Prefix, torch.nn.Module],
        owner: torch.nn.Module,
        core: Any,
        on_detach: Optional[Callable[[], None]] = None,
    ):
        self.source = source
        self.owner = weakref.ref(owner)
        self.core = weakref.ref(core)
        self.on_detach = on_detach


def _attachment_of(module: Any) -> Optional[_Attachment]:
    # A plain instance attribute (not a registry): cheap, and readable inside torch.compile.
    return module.__dict__.get(_ATTACHMENT_ATTR)


@functools.lru_cache(maxsize=None)
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def _bound_arguments(wrapped: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    if not args:
        return kwargs
    try:
        names = list(_signature(getattr(wrapped, "__func__", wrapped)).parameters)
    except (TypeError, ValueError):
        return kwargs
    if names and names[0] == "self" and hasattr(wrapped, "__self__"):
        names = names[1:]
    return {**dict(zip(names, args)), **kwargs}


def _take_prefix(wrapped: Callable, args: tuple, kwargs: dict) -> tuple[tuple, Optional[Prefix]]:
    """Pop ``prefix=`` and any Prefix passed where a cache goes (-> fresh cache)."""
    prefix = kwargs.pop("prefix", None)
    for name in _CACHE_NAMES:
        if isinstance(kwargs.get(name), Prefix):
            # Dropped rather than set to None: a fresh cache, and no deprecation warning for the old name.
            prefix = _one_prefix(prefix, kwargs.pop(name), name)
    if args and any(isinstance(arg, Prefix) for arg in args):
        args = list(args)
        for index, arg in enumerate(args):
            if isinstance(arg, Prefix):
                prefix = _one_prefix(prefix, arg, f"positional argument {index}")
                args[index] = None
        args = tuple(args)
    return args, prefix


def _one_prefix(current: Optional[Prefix], new: Prefix, where: str) -> Prefix:
    if current is not None and current is not new:
        raise PrefixError(f"two prefixes given: prefix= and a Prefix in {where}; pass only one")
    return new


def _input_batch(wrapped: Callable, args: tuple, kwargs: dict) -> Optional[int]:
    bound = _bound_arguments(wrapped, args, kwargs)
    for name in _BATCH_NAMES:
        value = bound.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    for name in ("encoder_outputs", "encoder_hidden_states"):
        value = bound.get(name)
        if value is not None and not isinstance(value, torch.Tensor):
            value = value[0] if len(value) else None
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _check_attention_implementation(core: Any) -> None:
    implementation = getattr(core.config, "_attn_implementation", "eager") or "eager"
    if implementation not in ("eager", "sdpa"):
        raise UnsupportedConfigurationError(
            f"prefixes run with attn_implementation 'eager' or 'sdpa', got {implementation!r}: load the model "
            "with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )


def _owners(instance: torch.nn.Module, core: Any) -> list:
    owners = [instance]
    for name in ("encoder", "decoder"):
        if hasattr(core, name):
            owners.append(getattr(core, name))
    if isinstance(core, torch.nn.Module):
        owners.append(core)
    return owners


def _resolve(
    instance: torch.nn.Module,
    source: Union[Prefix, torch.nn.Module],
    batch: Optional[int],
    expansions: tuple[int, ...] = (1,),
) -> PrefixState:
    """Turn a Prefix (or the module producing one) into a call's state."""
    attachment = _attachment_of(instance)
    core = (attachment.core() if attachment else None) or _core_of(instance)
    if core is None:
        raise PrefixError(f"expected a BART model, encoder or decoder, got {type(instance).__name__}")
    _check_attention_implementation(core)
    prefix = _call_source(source) if isinstance(source, torch.nn.Module) else source
    pairs = validate_prefix(prefix, core, batch)
    slices = {}
    for site, site_pairs in pairs.items():
        slices.update(zip(attention_modules(core, site), site_pairs))
    modules = [m for name in ("encoder", "decoder") if hasattr(core, name) for m in (getattr(core, name), *getattr(core, name).layers)]
    ensure_checkpoint_binding(modules)
    return PrefixState(slices, batch, expansions, _owners(instance, core))


def _entry_forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    args, prefix = _take_prefix(wrapped, args, kwargs)
    attachment = _attachment_of(instance)
    if not _APPLIED:
        if prefix is not None or attachment is not None:
            raise PatchNotAppliedError(f"a prefix was given to {type(instance).__name__}: {status_line()}")
        return wrapped(*args, **kwargs)
    if prefix is None:
        state = active_state()
        if state is not None and state.covers(instance):
            return wrapped(*args, **kwargs)  # nested in a call that already resolved the prefix
        if attachment is None:
            return wrapped(*args, **kwargs)
        prefix = attachment.source
    state = _resolve(instance, prefix, _input_batch(wrapped, args, kwargs))
    return run_with_state(state, wrapped, *args, **kwargs)


_STATIC_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "hybrid_chunked")


def _entry_generate(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    args, prefix = _take_prefix(wrapped, args, kwargs)
    attachment = _attachment_of(instance)
    if not _APPLIED:
        if prefix is not None or attachment is not None:
            raise PatchNotAppliedError(f"a prefix was given to {type(instance).__name__}.generate(): {status_line()}")
        return wrapped(*args, **kwargs)
    source = prefix if prefix is not None else (attachment.source if attachment else None)
    if source is None:
        return wrapped(*args, **kwargs)
    config = kwargs.get("generation_config") or instance.generation_config
    cache_implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if cache_implementation in _STATIC_CACHES:
        raise UnsupportedConfigurationError(
            f"a prefix needs a growable cache, got cache_implementation={cache_implementation!r}: a fixed-size "
            "cross-attention cache cannot hold [prefix ; encoder]. Use the default (dynamic) cache."
        )
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    # One prefix computation per generate() call, none per decoding step.
    with torch.no_grad():
        state = _resolve(instance, source, _input_batch(wrapped, args, kwargs), (1, beams, returned, beams * returned))
    return run_with_state(state, wrapped, *args, **kwargs)


# ------------------------------------------------------------ attach/detach


def attach(
    model: torch.nn.Module,
    prefix_or_module: Union[Prefix, torch.nn.Module],
    *,
    _on_detach: Optional[Callable[[], None]] = None,
) -> torch.nn.Module:
    """Make every later forward/generate of ``model`` use a prefix.

    Args:
        model: A BART model (any head containing a ``BartModel``, or the
            ``BartModel`` itself).
        prefix_or_module: A :class:`Prefix`, or an ``nn.Module`` called with no
            arguments that returns one. A module is registered on the model as
            ``model.bpp_prefix`` (its parameters join ``model.parameters()``
            and follow ``.to()``) and is called once per forward and once per
            ``generate()``.

    Returns:
        The same model.

    Raises:
        PatchNotAppliedError: The patch is not applied.
        PrefixError: Not a BART model, or the prefix does not fit it.
    """
    if not _APPLIED:
        raise PatchNotAppliedError(f"attach() needs the patch: {status_line()}")
    core = _core_of(model) if _is_bart_model(model) else None
    if core is None or not (hasattr(core, "encoder") and hasattr(core, "decoder")):
        raise PrefixError(
            f"attach() expected a BART model containing a BartModel (e.g. BartForConditionalGeneration), "
            f"got {type(model).__name__}"
        )
    if not isinstance(prefix_or_module, (Prefix, torch.nn.Module)):
        raise PrefixError(
            f"attach() expected a Prefix or an nn.Module returning one, got {type(prefix_or_module).__name__}"
        )
    detach(model)
    if isinstance(prefix_or_module, torch.nn.Module):
        model.add_module(ATTACHED_NAME, prefix_or_module)
        with torch.no_grad():
            validate_prefix(_call_source(prefix_or_module), core, None)
    else:
        validate_prefix(prefix_or_module, core, None)
    record = _Attachment(prefix_or_module, model, core, _on_detach)
    for module in (model, core, core.encoder, core.decoder):
        module.__dict__[_ATTACHMENT_ATTR] = record
    return model


def _call_source(module: torch.nn.Module) -> Prefix:
    prefix = module()
    if not isinstance(prefix, Prefix):
        raise PrefixError(
            f"the prefix module {type(module).__name__} must return a bart_prefix_patch.Prefix, "
            f"got {type(prefix).__name__}"
        )
    return prefix


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Remove an attached prefix (and its module) from ``model``."""
    record = _attachment_of(model)
    if record is not None:
        core = record.core()
        for module in (model, core, getattr(core, "encoder", None), getattr(core, "decoder", None)):
            if module is not None and module.__dict__.get(_ATTACHMENT_ATTR) is record:
                del module.__dict__[_ATTACHMENT_ATTR]
        if record.on_detach is not None:
            record.on_detach()
    if ATTACHED_NAME in model._modules:
        del model._modules[ATTACHED_NAME]
    return model


def attached(model: torch.nn.Module) -> Optional[Union[Prefix, torch.nn.Module]]:
    """The prefix or module attached to ``model``, if any."""
    record = _attachment_of(model)
    return record.source if record else None


__all__ = ["apply", "revert", "is_applied", "attach", "detach", "attached", "get_original", "SITES"]
