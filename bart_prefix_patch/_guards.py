"""Entry guards: where every prefixed call enters, and how wrappers are built.

An entry guard wraps the public entry points of a supported model family
(``forward`` of every model class of its module, ``generate``). When the
patch is applied, the outermost guard of a call resolves the call's prefix
(``prefix=``, a ``Prefix`` passed where a cache goes, or the attached one)
into a :class:`._state.PrefixState` and publishes it for the duration of the
call; the attention forks look their slice up there. When the patch is not
applied, a guard passes every call through untouched, except one carrying a
prefix, which raises :class:`PatchNotAppliedError` instead of being silently
ignored (stock 5.x forwards swallow unknown keyword arguments).

A call's path::

    BartForConditionalGeneration.forward / .generate   entry guard (_guards.entry_forward / entry_generate)
      -> resolve(): prefix -> validate_prefix -> PrefixState{attention module -> (key, value)}
      -> run_with_state(state, upstream forward)        state published in a ContextVar
         -> BartEncoder.forward / BartDecoder.forward   nested guards: state.covers() -> upstream
            -> BartAttention.forward                    fork wrapper (forks/_common.attention_wrapper)
               -> state.kv_for(self) ? fork(prefix_kv) : upstream
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Optional, Union

import torch

from ._attach import any_attached, attachment_of, call_source
from ._architectures import ARCHITECTURES
from ._models import architecture_of, attention_modules, core_of, stacks
from ._registry import is_applied, model_refusal, reverts, status_line
from ._state import (
    STATE_KWARG,
    PrefixState,
    active_state,
    ensure_checkpoint_binding,
    prefixed_call_in_flight,
    run_with_state,
    traceable,
)
from .errors import PatchNotAppliedError, PrefixError, UnsupportedConfigurationError, UnsupportedModelError
from .prefix import Prefix, site_visibility, validate_prefix

_CACHE_NAMES = ("cache", "past_key_values")
_BATCH_NAMES = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "inputs")
_STATIC_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "hybrid_chunked")


# ------------------------------------------------------------------ wrappers


def method_wrapper(wrapper: Callable, traced: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """A registry ``make`` that wraps an upstream method with ``wrapper(bound, self, args, kwargs)``.

    wrapt's calling convention, but the result is a plain function rather
    than a ``wrapt.FunctionWrapper`` object: TorchDynamo guards on the
    closures of the methods it traces and rejects proxy objects there.
    ``functools.wraps`` keeps ``__wrapped__`` and therefore
    ``inspect.signature``, which ``generate()`` uses to validate its keyword
    arguments.

    Args:
        traced: What runs instead of ``wrapper`` for a call that carries
            :data:`._state.STATE_KWARG` (nested in a traced prefixed call), and
            for a prefixed call torch.compile traces on a model class of
            :func:`._state.traceable`, with the unbound original:
            ``traced(original, self, args, kwargs)``. Without it such a call
            leaves the graph and runs ``wrapper`` eagerly.
    """

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def patched(self, *args, **kwargs):
            if traced is not None and STATE_KWARG in kwargs:
                return traced(original, self, args, kwargs)  # inside a traced prefixed call: the state came with it
            if torch.compiler.is_compiling():
                if not _prefix_involved(self, kwargs):
                    return original(self, *args, **kwargs)  # traced by torch.compile: exactly upstream
                if traced is not None and traceable(type(self)):
                    return traced(original, self, args, kwargs)
            # The unbound original crosses the graph break: Dynamo may rebuild a bound method as
            # `self.forward`, which is the compiled function itself when a user assigned one.
            return _eager(wrapper, original, self, args, kwargs)

        return patched

    return make


def _prefix_involved(instance: Any, kwargs: dict) -> bool:
    # Traceable by torch.compile without a graph break, and guarded: module globals, no ContextVar
    # (see _state._ANY_IN_FLIGHT and _attach._ANY_ATTACHED).
    return (
        "prefix" in kwargs
        or STATE_KWARG in kwargs
        or any(isinstance(kwargs.get(name), Prefix) for name in _CACHE_NAMES)
        or any_attached()
        or prefixed_call_in_flight()
    )


@torch.compiler.disable
def _eager(wrapper: Callable, original: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Run a wrapper (and everything below it) outside torch.compile.

    A prefixed call keeps its per-call state in a ContextVar, which a compiled
    graph would bake in; under torch.compile such a call therefore runs
    eagerly (correct, not faster), and calls without a prefix compile as in
    stock transformers. Outside torch.compile this decorator costs nothing.
    """
    return wrapper(original.__get__(instance, type(instance)), instance, args, kwargs)


# ------------------------------------------------------------------ helpers


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


def _take_prefix(args: tuple, kwargs: dict) -> tuple[tuple, Optional[Prefix]]:
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


def _cross_cache_length(cache: Any) -> Optional[int]:
    """Keys held by the first layer's cross-attention cache (legacy tuples or ``EncoderDecoderCache``), or None."""
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None:
        try:
            return int(cross.get_seq_length(0)) or None
        except (TypeError, AttributeError, IndexError):
            return None
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and len(cache[0]) == 4:
        return cache[0][2].shape[2]
    return None


def _refuse_prefixed_cache(instance: Any, wrapped: Callable, args: tuple, kwargs: dict) -> None:
    """Refuse a cache holding a cross-attention prefix when the call gives no prefix.

    Manual decoding reuses the cache a prefixed call returned; it holds
    ``[cross prefix ; encoder]`` but not the self-attention prefix, and the
    masks need the prefix columns: without the prefix the result is wrong.
    A cross cache longer than the encoder output can only hold a prefix.
    """
    cache = next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)
    if cache is None:
        return
    cached = _cross_cache_length(cache)
    if cached is None:
        return
    bound = _bound_arguments(wrapped, args, kwargs)
    encoder = bound.get("encoder_outputs", bound.get("encoder_hidden_states"))
    if encoder is not None and not isinstance(encoder, torch.Tensor):
        encoder = encoder[0] if len(encoder) else None
    source = encoder if isinstance(encoder, torch.Tensor) else bound.get("input_ids", bound.get("inputs_embeds"))
    if not isinstance(source, torch.Tensor) or source.dim() < 2:
        return
    if cached > source.shape[1]:
        raise PrefixError(
            f"the cache passed to {type(instance).__name__} holds a cross-attention prefix ({cached} cached keys for "
            f"{source.shape[1]} encoder positions) but the call gives no prefix: pass the same prefix= again when "
            "reusing a cache returned by a prefixed call"
        )


def _check_attention_implementation(core: Any) -> None:
    implementation = getattr(core.config, "_attn_implementation", "eager") or "eager"
    if implementation not in ("eager", "sdpa"):
        raise UnsupportedConfigurationError(
            f"prefixes run with attn_implementation 'eager' or 'sdpa', got {implementation!r}: load the model "
            "with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))"
        )


def resolve(
    instance: torch.nn.Module,
    source: Union[Prefix, torch.nn.Module],
    batch: Optional[int],
    expansions: tuple[int, ...] = (1,),
) -> PrefixState:
    """Turn a Prefix (or the module producing one) into a call's state."""
    attachment = attachment_of(instance)
    row = architecture_of(instance)
    refusal = model_refusal(row.model_type) if row is not None else None
    if refusal:
        raise PatchNotAppliedError(f"a prefix was given to {type(instance).__name__}: {refusal}")
    core = (attachment.core() if attachment else None) or core_of(instance)
    if core is None:
        raise PrefixError(f"expected a supported model, encoder or decoder, got {type(instance).__name__}")
    _check_attention_implementation(core)
    prefix = call_source(source) if isinstance(source, torch.nn.Module) else source
    pairs = validate_prefix(prefix, core, batch)
    visible = site_visibility(prefix, pairs)  # stacked rows of different lengths (Prefix.stack)
    slices, rows = {}, {}
    for site, site_pairs in pairs.items():
        present = [(module, pair) for module, pair in zip(attention_modules(core, site), site_pairs) if pair is not None]
        slices.update(present)
        if site in visible:
            rows.update((module, visible[site]) for module, _ in present)
    ensure_checkpoint_binding(m for stack in stacks(core) for m in (stack, *stack.layers))
    owners = [instance, *stacks(core)] + ([core] if isinstance(core, torch.nn.Module) else [])
    return PrefixState(slices, batch, expansions, owners, rows)


# ------------------------------------------------------------------ guards


def run_whole(before: int, instance: Any, state: PrefixState, wrapped: Callable, args: tuple, kwargs: dict) -> Any:
    """``run_with_state``, refusing a result that a concurrent ``revert()`` may have mixed.

    Args:
        before: :func:`._registry.reverts` read at the call's entry, before the patch state.
    """
    message = (
        f"bpp.revert() ran while this {type(instance).__name__} call with a prefix was in flight: some layers "
        "may have run without the prefix, so the result was discarded. Call bpp.apply() and run it again."
    )
    try:
        result = run_with_state(state, wrapped, *args, **kwargs)
    except Exception as error:
        if reverts() != before:  # e.g. stock attention meeting a cache that holds [prefix ; encoder]
            raise PatchNotAppliedError(message) from error
        raise
    if reverts() != before:
        raise PatchNotAppliedError(message)
    return result


def _enter(instance: Any, args: tuple, kwargs: dict, what: str) -> tuple[int, bool, tuple, Optional[Prefix], Any]:
    """What every entry guard reads first: the revert count, the patch state, the call's prefix, the attachment.

    The patch state is read once, here: a guard that read it again could see a
    ``revert()`` that ran in between and hand a prefixed call to stock code
    without its prefix (after the count check of :func:`run_whole` was skipped).

    Raises:
        PatchNotAppliedError: A prefix (given or attached) while the patch is not applied.
    """
    before = reverts()  # read before the patch state (see run_whole)
    args, prefix = _take_prefix(args, kwargs)
    attachment = attachment_of(instance)
    applied = is_applied()
    if not applied and (prefix is not None or attachment is not None):
        raise PatchNotAppliedError(f"a prefix was given to {type(instance).__name__}{what}: {status_line()}")
    return before, applied, args, prefix, attachment


def entry_forward(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Entry guard of ``forward``: resolve and publish the call's prefix."""
    before, applied, args, prefix, attachment = _enter(instance, args, kwargs, "")
    if not applied:
        return wrapped(*args, **kwargs)
    state, resolved_here = _forward_state(instance, wrapped, args, kwargs, prefix, attachment)
    if not resolved_here:  # no prefix, or nested in a call that already resolved it
        return wrapped(*args, **kwargs)
    return run_whole(before, instance, state, wrapped, args, kwargs)


def _forward_state(
    instance: Any, wrapped: Callable, args: tuple, kwargs: dict, prefix: Optional[Prefix], attachment: Any
) -> tuple[Optional[PrefixState], bool]:
    """The state a forward call runs with, and whether this call resolved it.

    ``(state, False)`` for a call nested in one that already resolved the prefix
    (an eager ``generate()`` step, a stack inside its model), ``(None, False)``
    for a call without any prefix (after refusing a prefixed cache), else the
    given or attached prefix resolved here.
    """
    if prefix is None:
        state = active_state()
        if state is not None and state.covers(instance):
            return state, False
        if attachment is None:
            _refuse_prefixed_cache(instance, wrapped, args, kwargs)
            return None, False
        prefix = attachment.source
    return resolve(instance, prefix, _input_batch(wrapped, args, kwargs)), True


def entry_generate(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Entry guard of ``generate``: one prefix computation per call, expanded to beams and returned sequences."""
    before, applied, args, prefix, attachment = _enter(instance, args, kwargs, ".generate()")
    if not applied:
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
        state = resolve(instance, source, _input_batch(wrapped, args, kwargs), (1, beams, returned, beams * returned))
    return run_whole(before, instance, state, wrapped, args, kwargs)


# ------------------------------------------------- prefixed calls under torch.compile


def traced_forward(original: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``entry_forward`` as torch.compile traces it: the state travels as a keyword argument.

    The prefix is resolved outside the graph (:func:`_traced_state`: one graph
    break at the entry); the upstream forward below it is traced with
    ``STATE_KWARG=state``, which transformers 5.4+ hands through every stack and
    layer to the attention forks. A call nested in one that already carries the
    state passes it on untouched.
    """
    if STATE_KWARG in kwargs:
        return original(instance, *args, **kwargs)
    prepared = _traced_state(original, instance, args, kwargs)
    if prepared is None:  # gradient checkpointing or a refusal to raise: the eager guard decides
        return _eager(entry_forward, original, instance, args, kwargs)
    args, kwargs, state = prepared
    if state is None:
        return original(instance, *args, **kwargs)
    return original(instance, *args, **{**kwargs, STATE_KWARG: state})


def carried(wrapper: Callable) -> Callable:
    """A ``traced`` for :func:`method_wrapper`: run ``wrapper`` inside the graph when the call carries the state.

    For the attention forks: a call reached from a traced entry carries
    :data:`._state.STATE_KWARG` and is traced with its prefix; any other
    prefixed call (a layer compiled on its own inside an eager prefixed call)
    leaves the graph to read the ContextVar, as before.
    """

    def traced(original: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        if STATE_KWARG not in kwargs:
            return _eager(wrapper, original, instance, args, kwargs)
        return wrapper(original.__get__(instance, type(instance)), instance, args, kwargs)

    return traced


@torch.compiler.disable
def _traced_state(original: Callable, instance: Any, args: tuple, kwargs: dict):
    """What :func:`entry_forward` resolves, returned instead of published: ``(args, kwargs, state)``.

    ``None`` when the call must run eagerly: the patch is not applied (a
    prefixed call raises ``PatchNotAppliedError`` here, as the eager guard
    would), or a stack checkpoints its layers (recomputation reads the state
    from the ContextVar).
    """
    kwargs = dict(kwargs)
    # _enter raises for a prefix while the patch is not applied, as the eager guard would.
    _, applied, args, prefix, attachment = _enter(instance, args, kwargs, "")
    if not applied:
        return None
    if _checkpoints(instance, attachment):
        return None
    # A nested call's state (e.g. a step of an eager generate() calling a compiled forward) is
    # passed down like one resolved here.
    state, _ = _forward_state(instance, original.__get__(instance, type(instance)), args, kwargs, prefix, attachment)
    return args, kwargs, state


def _checkpoints(instance: Any, attachment: Any = None) -> bool:
    """Whether a stack of ``instance``'s model checkpoints its layers (recomputation reads the ContextVar)."""
    core = (attachment.core() if attachment else None) or core_of(instance)
    return core is not None and any(getattr(stack, "gradient_checkpointing", False) for stack in stacks(core))


def state_into_model_inputs(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``prepare_inputs_for_generation`` that hands the ``generate()`` call's state to every step.

    Installed with the forks on model classes of :func:`._state.traceable`
    (transformers 5.4+). Each decoding step's model inputs carry
    :data:`._state.STATE_KWARG`, so the step's forward finds the state among
    its arguments, as a nested traced call does (:func:`traced_forward`): a
    compiled forward (``model.forward = torch.compile(model.forward)``) no
    longer leaves the graph once per step to read it (benchmarks/bench_compile_entry.py),
    and an eager one skips the per-step lookup. ``generate()`` validates only
    the caller's keyword arguments, never these inputs. Nothing is added
    without a prefixed call of this model in flight, or when a stack
    checkpoints its layers (as :func:`_traced_state` decides).
    """
    inputs = wrapped(*args, **kwargs)
    state = active_state()
    if (
        state is not None
        and isinstance(inputs, dict)
        and STATE_KWARG not in inputs
        and state.covers(instance)
        and traceable(type(instance))
        and not _checkpoints(instance)
    ):
        inputs[STATE_KWARG] = state
    return inputs


def model_input_targets(model_classes: Iterable[type]) -> list[tuple[type, str, Callable]]:
    """``(class, "prepare_inputs_for_generation", state_into_model_inputs)`` for the classes that generate."""
    return [(cls, "prepare_inputs_for_generation", state_into_model_inputs)
            for cls in sorted(model_classes, key=lambda c: c.__qualname__)
            if callable(getattr(cls, "prepare_inputs_for_generation", None)) and _generates(cls)]


def guard_targets(model_classes: list[type]) -> list[tuple[type, str, Callable]]:
    """``(class, attribute, guard)`` for a family's model classes: every ``forward``, and ``generate`` where it exists."""
    targets = []
    for cls in model_classes:
        if "forward" in cls.__dict__:
            targets.append((cls, "forward", entry_forward))
        if callable(getattr(cls, "generate", None)) and _generates(cls):
            targets.append((cls, "generate", entry_generate))
    return targets


def _generates(cls: type) -> bool:
    try:
        return bool(cls.can_generate())  # transformers' own answer (4.x gives every model a generate())
    except Exception:  # pragma: no cover - a class whose can_generate needs an instance
        return False


# ------------------------------------------------- models outside the table


def _unsupported(instance: Any, where: str) -> str:
    model_type = getattr(getattr(instance, "config", None), "model_type", None)
    return (
        f"a prefix was given to {type(instance).__name__}{where} (model type {model_type!r}), which bart_prefix_patch "
        f"does not support: its attention would ignore the prefix. Supported model types: "
        f"{', '.join(sorted(ARCHITECTURES))} (docs/supported-models.md)"
    )


def _carries_prefix(kwargs: dict) -> bool:
    return "prefix" in kwargs or any(isinstance(kwargs.get(name), Prefix) for name in _CACHE_NAMES)


def _refuse_unsupported_call(original: Callable) -> Callable:
    """``PreTrainedModel.__call__`` that refuses a prefix given to a model outside the table.

    Stock 5.x forwards take ``**kwargs`` and would silently drop ``prefix=``.
    A supported model's own entry guard takes the prefix out of the call
    before the stock code runs, so this only ever sees the others. It costs
    one dictionary lookup per model call and traces under torch.compile.
    """

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        if _carries_prefix(kwargs) and architecture_of(self) is None:
            raise UnsupportedModelError(_unsupported(self, ""))
        return original(self, *args, **kwargs)

    return __call__


def _refuse_unsupported_generate(original: Callable) -> Callable:
    """``GenerationMixin.generate`` that refuses a prefix for a model outside the table."""

    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if _carries_prefix(kwargs) and architecture_of(self) is None:
            raise UnsupportedModelError(_unsupported(self, ".generate()"))
        return original(self, *args, **kwargs)

    return generate


def refusal_targets() -> list[tuple[type, str, Callable[[Callable], Callable]]]:
    """``(class, attribute, make)`` of the guards that refuse prefixes for every model outside the table."""
    from transformers import PreTrainedModel
    from transformers.generation.utils import GenerationMixin

    return [(PreTrainedModel, "__call__", _refuse_unsupported_call), (GenerationMixin, "generate", _refuse_unsupported_generate)]
