"""PEFT integration: PEFT's prefix-tuning runs BART the way prefix-tuning is meant to.

Stock PEFT (0.21) hands its prefix to BART as ``past_key_values``: on
transformers 5.x ``generate()`` ignores it, on 4.57 ``generate()`` and the
teacher-forced forward disagree, the cross-attention half it computes is thrown
away (``cross_attention_cache = DynamicCache()``), and the decoder positions
are shifted by the prefix length. With this integration (installed lazily by a
wrapt post-import hook on ``peft``, removed by :func:`bart_prefix_patch.revert`
or ``bpp.apply(peft=False)``), for a ``PeftModelForSeq2SeqLM`` with a
``PREFIX_TUNING`` adapter on a BART model:

* ``forward`` and ``generate`` compute PEFT's prompt once per call and hand the
  base model ``prefix=Prefix(decoder=..., cross=...)`` (:func:`peft_prefix`)
  instead of a cache; the core patch does the rest (prefix concatenated with the
  real keys/values, cross prefix with the encoder, positions unshifted, stock
  ``generate()`` bookkeeping);
* ``decoder_attention_mask`` covers the real decoder tokens only (PEFT's P
  leading ones are not added);
* adapters saved with the integration carry ``"bart_prefix_patch": {"semantics":
  "full", ...}`` in ``adapter_config.json``; an adapter loaded without that key
  was trained by stock PEFT and runs the way it was trained ("legacy":
  decoder self-attention prefix only, decoder positions shifted by P), in
  forward and in ``generate()``, with a :class:`PeftIntegrationWarning`
  (:func:`set_peft_semantics` opts it in to the full semantics).

Every other PEFT model (LoRA, other tasks, other architectures, disabled
adapters) runs PEFT's own code untouched. See docs/peft.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
import wrapt

from .errors import PrefixError
from .prefix import Prefix

#: Environment variable: "0" / "false" / "no" / "off" keeps PEFT's own behaviour
#: (unless ``bpp.apply(peft=True)`` says otherwise).
ENV_VAR = "BART_PREFIX_PATCH_PEFT"
#: Key added to ``adapter_config.json`` by adapters saved with the integration.
CONFIG_KEY = "bart_prefix_patch"
FULL, LEGACY = "full", "legacy"
SEMANTICS = (FULL, LEGACY)
#: Oldest PEFT whose prefix-tuning internals (``prompt_encoder``, ``prompt_tokens``,
#: ``get_prompt`` layout) this integration was written and tested against.
MIN_PEFT = (0, 21)

_SEMANTICS_ATTR = "_bpp_semantics"  # on a PeftConfig: FULL, LEGACY or absent (a fresh config: FULL)
_SAVED_ATTR = "_bpp_saved_semantics"  # on a PeftConfig read from a file: what the file says
_WARNED_ATTR = "_bpp_legacy_warned"
_SHIFT_HOOK_ATTR = "_bpp_position_shift_hook"


class PeftIntegrationWarning(UserWarning):
    """What the PEFT integration changed, or how it runs a legacy checkpoint."""


_LOCK = threading.RLock()
_WANTED: Optional[bool] = None  # the last apply(peft=...) choice; None: the environment variable decides
_HOOK_REGISTERED = False
_INSTALLED: dict[tuple[type, str], tuple[Any, Any]] = {}  # (owner, attr) -> (original __dict__ entry, installed)
_ANNOUNCED = False
_VERSION_WARNED = False
_SHIFT_HOOKS: list[tuple[weakref.ref, Any]] = []  # (embed_positions module, hook handle)
_SHIFTS: contextvars.ContextVar[dict] = contextvars.ContextVar("bart_prefix_position_shift", default={})


# ---------------------------------------------------------------- switching


def wanted() -> bool:
    """Whether the integration should be on (the last ``apply(peft=...)``, else the environment)."""
    if _WANTED is not None:
        return _WANTED
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def is_installed() -> bool:
    """Whether PEFT's methods are currently wrapped."""
    return bool(_INSTALLED)


def configure(peft: Optional[bool] = None) -> None:
    """Record a choice (``None`` keeps the current one) and install or remove the wrappers to match.

    Called by :func:`bart_prefix_patch.apply` and :func:`bart_prefix_patch.revert`.
    The wrappers are on exactly when the core patch is applied, the integration
    is wanted, and peft has been imported (the post-import hook installs them
    the moment it is).
    """
    global _WANTED, _HOOK_REGISTERED
    with _LOCK:
        if peft is not None:
            _WANTED = bool(peft)
        if not _HOOK_REGISTERED:
            _HOOK_REGISTERED = True
            # Called at once when peft is already imported, else right after its import.
            wrapt.register_post_import_hook(_on_peft_import, "peft")
        _sync()


def _on_peft_import(module: Any) -> None:
    try:
        with _LOCK:
            _sync()
    except Exception as error:  # never break `import peft`
        warnings.warn(
            f"bart_prefix_patch: the PEFT integration could not be installed ({type(error).__name__}: {error}); "
            "PEFT runs unchanged",
            RuntimeWarning,
            stacklevel=2,
        )


def _sync() -> None:
    from ._patcher import is_applied

    if "peft" not in sys.modules or getattr(sys.modules["peft"], "__version__", None) is None:
        return  # not imported (or still importing): the post-import hook calls again
    if is_applied() and wanted():
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
    if _INSTALLED or not _version_ok():
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
    for (owner, attr), (original, installed) in list(_INSTALLED.items()):
        if owner.__dict__.get(attr) is installed:  # somebody else's later replacement is theirs
            setattr(owner, attr, original)
        del _INSTALLED[(owner, attr)]
    while _SHIFT_HOOKS:
        module_ref, handle = _SHIFT_HOOKS.pop()
        handle.remove()
        module = module_ref()
        if module is not None:
            module.__dict__.pop(_SHIFT_HOOK_ATTR, None)


def _wrap_method(owner: type, attr: str, handler: Callable) -> None:
    original = owner.__dict__[attr]

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        return handler(original, self, args, kwargs)

    setattr(owner, attr, patched)
    _INSTALLED[(owner, attr)] = (original, patched)


def _wrap_classmethod(owner: type, attr: str, handler: Callable) -> None:
    original = owner.__dict__[attr]
    function = original.__func__

    @functools.wraps(function)
    def patched(cls, *args, **kwargs):
        return handler(function, cls, args, kwargs)

    installed = classmethod(patched)
    setattr(owner, attr, installed)
    _INSTALLED[(owner, attr)] = (original, installed)


# ------------------------------------------------------------- which models


def _prefix_tuning(config: Any) -> bool:
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type) == "PREFIX_TUNING"


def _bart_core(peft_model: Any) -> Any:
    """The BartModel inside a PeftModel's base model, or None if it is not a BART model."""
    from ._patcher import _core_of, _is_bart_model

    base = peft_model.get_base_model()
    if not _is_bart_model(base):
        return None
    core = _core_of(base)
    return core if hasattr(core, "encoder") and hasattr(core, "decoder") else None


def _semantics_of(config: Any) -> str:
    return LEGACY if getattr(config, _SEMANTICS_ATTR, None) == LEGACY else FULL


def _mode(peft_model: Any) -> Optional[str]:
    """FULL or LEGACY when the integration runs this model's call, None for PEFT's own code."""
    from ._patcher import is_applied

    if not _INSTALLED or not is_applied() or getattr(peft_model, "_adapters_disabled", False):
        return None
    config = peft_model.active_peft_config
    if not _prefix_tuning(config) or _bart_core(peft_model) is None:
        return None
    return _semantics_of(config)


def peft_semantics(peft_model: Any, adapter_name: Optional[str] = None) -> Optional[str]:
    """How the integration runs an adapter: ``"full"``, ``"legacy"``, or None (PEFT's own code).

    None when the integration is off, the adapter is not prefix-tuning, or the
    base model is not a BART model.
    """
    config = _adapter_config(peft_model, adapter_name)
    from ._patcher import is_applied

    if not _INSTALLED or not is_applied() or not _prefix_tuning(config) or _bart_core(peft_model) is None:
        return None
    return _semantics_of(config)


def set_peft_semantics(peft_model: Any, semantics: str, adapter_name: Optional[str] = None) -> None:
    """Choose how a prefix-tuning adapter runs: ``"full"`` or ``"legacy"``.

    ``"full"`` opts a checkpoint trained by stock PEFT in to the full semantics
    (decoder self- and cross-attention prefix, unshifted positions; its cross
    half was never trained, so fine-tune it before relying on it). The choice is
    recorded on the adapter's config, so ``save_pretrained`` writes it.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    config = _adapter_config(peft_model, adapter_name)
    if not _prefix_tuning(config):
        raise PrefixError(f"set_peft_semantics: the adapter is {getattr(config, 'peft_type', None)}, not PREFIX_TUNING")
    setattr(config, _SEMANTICS_ATTR, semantics)


def _adapter_config(peft_model: Any, adapter_name: Optional[str]) -> Any:
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise PrefixError(f"expected a peft.PeftModel, got {type(peft_model).__name__}")
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    if name not in configs:
        raise PrefixError(f"the model has no adapter {name!r} (adapters: {sorted(configs)})")
    return configs[name]


# ---------------------------------------------------------------- the prefix


def peft_prefix(peft_model: Any, semantics: Optional[str] = None) -> Prefix:
    """The :class:`Prefix` the integration hands the base model for a PEFT prefix-tuning adapter.

    PEFT's prompt encoder produces ``num_layers * 2`` key/value rows per virtual
    token (its ``num_layers``, heads and width come from the config's *encoder*
    entries). PEFT's own ``get_prompt`` duplicates them along the layer axis
    (``num_transformer_submodules=2``) and cuts the result into one
    ``(self_k, self_v, cross_k, cross_v)`` entry per layer; this function does
    the same, then maps entry ``i mod num_layers`` to decoder layer ``i`` (the
    entry stock PEFT feeds decoder layer ``i`` whenever it has one; with fewer
    entries than decoder layers they repeat) and reshapes each key/value from
    PEFT's head count to the decoder's (the same ``d_model`` features, split
    into the decoder's heads). ``"legacy"`` leaves out the cross half, as stock
    PEFT does.

    Args:
        peft_model: A ``PeftModelForSeq2SeqLM`` with an active PREFIX_TUNING adapter on a BART model.
        semantics: ``"full"`` or ``"legacy"``; default: the adapter's own (:func:`peft_semantics`).

    Returns:
        A batch-1 prefix (it broadcasts), with gradients when the prompt encoder
        is trainable and autograd is on.
    """
    config = peft_model.active_peft_config
    if not _prefix_tuning(config):
        raise PrefixError(f"peft_prefix: the active adapter is {config.peft_type}, not PREFIX_TUNING")
    core = _bart_core(peft_model)
    if core is None:
        raise PrefixError(f"peft_prefix: expected a BART base model, got {type(peft_model.get_base_model()).__name__}")
    semantics = semantics or _semantics_of(config)
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    adapter = peft_model.active_adapter
    encoder = peft_model.prompt_encoder[adapter]
    length, layers = config.num_virtual_tokens, config.num_layers
    heads, width = config.num_attention_heads, config.token_dim
    d_model = core.config.d_model
    decoder_heads = core.config.decoder_attention_heads
    if width != d_model or width % heads:
        raise PrefixError(
            f"PrefixTuningConfig(token_dim={width}, num_attention_heads={heads}) does not fit the model "
            f"(d_model={d_model}): token_dim must equal d_model and be divisible by num_attention_heads"
        )
    submodules = config.num_transformer_submodules or 2
    # As PEFT's get_prompt (peft_model.py), for one row: the rows of a batch are identical.
    if config.inference_mode:
        raw = encoder.embedding.weight.unsqueeze(0)
    else:
        tokens = peft_model.prompt_tokens[adapter][:length].unsqueeze(0).to(encoder.embedding.weight.device)
        raw = encoder(tokens)
    dtype = peft_model.base_model_torch_dtype
    if dtype is not None:
        raw = raw.to(dtype)
    raw = raw.view(1, length, layers * 2, heads, width // heads)
    if submodules == 2:
        raw = torch.cat([raw, raw], dim=2)
    entries = raw.permute([2, 0, 3, 1, 4]).split(submodules * 2)

    def to_decoder_heads(tensor: torch.Tensor) -> torch.Tensor:
        if heads == decoder_heads:
            return tensor
        flat = tensor.transpose(1, 2).reshape(1, length, d_model)
        return flat.view(1, length, decoder_heads, d_model // decoder_heads).transpose(1, 2)

    decoder, cross = [], []
    for index in range(len(core.decoder.layers)):
        entry = entries[index % len(entries)]
        decoder.append((to_decoder_heads(entry[0]), to_decoder_heads(entry[1])))
        if submodules == 2 and semantics == FULL:
            cross.append((to_decoder_heads(entry[2]), to_decoder_heads(entry[3])))
    return Prefix(decoder=decoder, cross=cross or None)


# ------------------------------------------------------- legacy: positions


def _shift_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    shift = _SHIFTS.get().get(id(module))
    if not shift:
        return None
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
    elif len(args) >= 2:
        args = (args[0], args[1] + shift, *args[2:])
    else:
        names = list(inspect.signature(module.forward).parameters)
        name = names[1] if len(names) > 1 else "past_key_values_length"
        kwargs[name] = kwargs.get(name, 0) + shift
    return args, kwargs


@contextlib.contextmanager
def _positions_shifted(core: Any, shift: int):
    """Decoder positions start at ``shift`` (stock PEFT's training-time positions) inside the block."""
    if not shift:
        yield
        return
    module = core.decoder.embed_positions
    if _SHIFT_HOOK_ATTR not in module.__dict__:
        handle = module.register_forward_pre_hook(_shift_hook, with_kwargs=True)
        module.__dict__[_SHIFT_HOOK_ATTR] = handle
        _SHIFT_HOOKS.append((weakref.ref(module), handle))
    token = _SHIFTS.set({**_SHIFTS.get(), id(module): shift})
    try:
        yield
    finally:
        _SHIFTS.reset(token)


# ------------------------------------------------------------------ warnings

_INTERNAL = tuple(
    os.path.dirname(path) + os.sep
    for path in (__file__, torch.__file__, contextlib.__file__)
) + ("<frozen",)


def _user_stacklevel() -> int:
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


def _announce() -> None:
    global _ANNOUNCED
    if _ANNOUNCED:
        return
    _ANNOUNCED = True
    warnings.warn(
        "bart_prefix_patch changes how PEFT prefix-tuning runs on BART: the prefix now reaches decoder "
        "self-attention and cross-attention (concatenated with the encoder; stock PEFT throws the cross half "
        "away), in forward and in generate() (stock generate() ignores or misplaces it); decoder positions are "
        "no longer shifted by num_virtual_tokens; decoder_attention_mask covers the real tokens only. Adapters "
        f"saved now record this in adapter_config.json ({CONFIG_KEY!r}); adapters trained without it run as "
        f"trained. To keep PEFT's own behaviour: bart_prefix_patch.apply(peft=False) or {ENV_VAR}=0. "
        "See docs/peft.md.",
        PeftIntegrationWarning,
        stacklevel=_user_stacklevel(),
    )


def _warn_legacy(config: Any) -> None:
    if getattr(config, _WARNED_ATTR, False):
        return
    setattr(config, _WARNED_ATTR, True)
    length = getattr(config, "num_virtual_tokens", "P")
    warnings.warn(
        "bart_prefix_patch: this PEFT prefix-tuning adapter was saved without bart_prefix_patch (no "
        f"{CONFIG_KEY!r} key in its adapter_config.json), so it runs the way stock PEFT trained it: the prefix "
        f"reaches decoder self-attention only (its cross-attention half was never trained and is not used) and "
        f"decoder positions are shifted by the prefix length ({length}), in forward and in generate() alike. "
        "To opt in to the full semantics (decoder self- and cross-attention prefix, unshifted positions; "
        "fine-tune before relying on it): bart_prefix_patch.set_peft_semantics(model, 'full').",
        PeftIntegrationWarning,
        stacklevel=_user_stacklevel(),
    )


# ------------------------------------------------------------------ wrappers


def _bind(function: Callable, instance: Any, args: tuple, kwargs: dict) -> dict:
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


def _adjust_kwargs(peft_model: Any, config: Any, mode: str, kwargs: dict) -> None:
    """PEFT's own keyword adjustments, except the position-id shift under the full semantics."""
    adjust = getattr(peft_model, "_adjust_prompt_learning_kwargs", None)
    if adjust is None:
        return
    position_ids = kwargs.get("position_ids")
    adjust(config, kwargs=kwargs)
    if mode == FULL and position_ids is not None:
        kwargs["position_ids"] = position_ids


def _start(peft_model: Any, mode: str) -> tuple[Any, Any, int]:
    config = peft_model.active_peft_config
    if mode == LEGACY:
        _warn_legacy(config)
    else:
        _announce()
    shift = config.num_virtual_tokens if mode == LEGACY else 0
    return config, _bart_core(peft_model), shift


def _forward(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModelForSeq2SeqLM.forward``: the prompt as ``prefix=`` instead of a cache."""
    mode = _mode(self)
    if mode is None:
        return original(self, *args, **kwargs)  # traceable by torch.compile, as upstream
    return _prefixed_forward(original, self, args, kwargs, mode)


@torch.compiler.disable  # a prefixed call runs eagerly (docs/how-it-works.md)
def _prefixed_forward(original: Callable, self: Any, args: tuple, kwargs: dict, mode: str) -> Any:
    config, core, shift = _start(self, mode)
    arguments = _bind(original, self, args, kwargs)
    arguments.pop("task_ids", None)  # not used by prefix tuning (PEFT ignores it too)
    _adjust_kwargs(self, config, mode, arguments)
    prefix = peft_prefix(self, mode)
    with _positions_shifted(core, shift):
        return self.base_model(**arguments, prefix=prefix)


def _generate(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModelForSeq2SeqLM.generate``: stock ``generate()`` with ``prefix=``, no cache injection."""
    mode = _mode(self)
    if mode is None or args:
        return original(self, *args, **kwargs)
    return _prefixed_generate(self, kwargs, mode)


@torch.compiler.disable
def _prefixed_generate(self: Any, kwargs: dict, mode: str) -> Any:
    if "input_ids" not in kwargs:
        raise ValueError("input_ids must be provided for Peft model generation")  # as PEFT
    config, core, shift = _start(self, mode)
    kwargs = dict(kwargs)
    kwargs.pop("task_ids", None)
    _adjust_kwargs(self, config, mode, kwargs)
    with torch.no_grad():
        prefix = peft_prefix(self, mode)
    with _positions_shifted(core, shift):
        return self.base_model.generate(**kwargs, prefix=prefix)


def _model_save_pretrained(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModel.save_pretrained``: prefix-tuning adapters of a BART model run with the full semantics are marked."""
    from ._patcher import is_applied

    if is_applied() and isinstance(getattr(self, "peft_config", None), dict):
        for config in self.peft_config.values():
            if _prefix_tuning(config) and _semantics_of(config) == FULL and _bart_core(self) is not None:
                setattr(config, _SEMANTICS_ATTR, FULL)
    return original(self, *args, **kwargs)


def _config_save_pretrained(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftConfig.save_pretrained``: write the marker next to PEFT's own keys."""
    result = original(self, *args, **kwargs)
    if getattr(self, _SEMANTICS_ATTR, None) != FULL:
        return result
    from peft.utils import CONFIG_NAME

    from . import __version__

    directory = _bind(original, self, args, kwargs)["save_directory"]
    path = os.path.join(directory, CONFIG_NAME)
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    data[CONFIG_KEY] = {"semantics": FULL, "version": __version__}
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True))  # PEFT's own format
    return result


def _saved_semantics(marker: Any) -> str:
    return FULL if isinstance(marker, dict) and marker.get("semantics") == FULL else LEGACY


def _from_peft_type(function: Callable, cls: type, args: tuple, kwargs: dict) -> Any:
    """``PeftConfig.from_peft_type`` (behind every config PEFT reads from a file): read and strip the marker."""
    kwargs = dict(kwargs)
    marker = kwargs.pop(CONFIG_KEY, None)
    config = function(cls, *args, **kwargs)
    if _prefix_tuning(config):
        setattr(config, _SAVED_ATTR, _saved_semantics(marker))
    return config


def _marker_on_disk(model_id: Any, subfolder: Optional[str]) -> str:
    """The semantics recorded in a local adapter directory (LEGACY when there is no marker to read)."""
    from peft.utils import CONFIG_NAME

    path = os.path.join(str(model_id), subfolder or "", CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            return _saved_semantics(json.load(handle).get(CONFIG_KEY))
    except (OSError, ValueError, AttributeError):
        return LEGACY


def _load_adapter(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
    """``PeftModel.load_adapter`` (also behind ``from_pretrained``): weights from a checkpoint decide the semantics.

    A prefix-tuning adapter whose weights come from a checkpoint without the
    marker (trained by stock PEFT) runs with the legacy semantics, with a
    warning; an explicit :func:`set_peft_semantics` choice is kept.
    """
    result = original(self, *args, **kwargs)
    try:
        arguments = _bind(original, self, args, kwargs)
        config = self.peft_config.get(arguments.get("adapter_name"))
    except (TypeError, AttributeError):
        return result
    if not _prefix_tuning(config):
        return result
    if getattr(config, _SEMANTICS_ATTR, None) is None:
        saved = getattr(config, _SAVED_ATTR, None)
        if saved is None:  # a config passed in, not read from the checkpoint
            saved = _marker_on_disk(arguments.get("model_id"), arguments.get("subfolder"))
        setattr(config, _SEMANTICS_ATTR, saved)
    if _semantics_of(config) == LEGACY and _bart_core(self) is not None:
        _warn_legacy(config)
    return result


__all__ = [
    "ENV_VAR",
    "CONFIG_KEY",
    "PeftIntegrationWarning",
    "peft_prefix",
    "peft_semantics",
    "set_peft_semantics",
]
