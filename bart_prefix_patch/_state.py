"""Per-call prefix state: which attention module gets which key/value slice.

One :class:`PrefixState` is built at the outermost entry of a model call
(forward, ``generate()``, or the encoder called alone) and published in a
:class:`contextvars.ContextVar` for the duration of that call. Attention
forks look themselves up in it; an attention module that is not in the map
(another model, a site without prefix, no active call) runs the unmodified
upstream code. Because the state lives in a ContextVar and not on the model,
a prefix never leaks into the next call, another model, or another thread.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from typing import Callable, Iterable, Optional

import torch

from .errors import PrefixError

KeyValue = tuple[torch.Tensor, torch.Tensor]


class PrefixKV(tuple):
    """A module's ``(key, value)`` prefix at its runtime batch, plus which columns each row may see.

    A plain 2-tuple to every fork (``key, value = prefix_kv``); ``visible`` is
    ``None`` when every row sees every prefix column (the common, fast case),
    else a ``(batch, prefix_len)`` bool tensor (a stacked prefix whose rows
    have different lengths: see :meth:`bart_prefix_patch.Prefix.stack`), which
    :func:`bart_prefix_patch.forks._masks.prefixed_mask` turns into mask columns.
    """

    visible: Optional[torch.Tensor]

    def __new__(cls, key: torch.Tensor, value: torch.Tensor, visible: Optional[torch.Tensor] = None):
        pair = super().__new__(cls, (key, value))
        pair.visible = visible
        return pair

_ACTIVE: contextvars.ContextVar[Optional["PrefixState"]] = contextvars.ContextVar("bart_prefix_state", default=None)

# Whether a prefixed call is in flight in this process, any thread. torch.compile cannot trace a
# ContextVar read (a graph break in every wrapper), but it traces and guards on a module global:
# compiled code reads this flag, runs the upstream code while it is False, and only otherwise
# leaves the graph to look the state up. A bool (not the count) so that the guard changes, and
# the code recompiles, only when the first call starts or the last one ends.
_ANY_IN_FLIGHT = False
_IN_FLIGHT = 0
_IN_FLIGHT_LOCK = threading.Lock()

#: Keyword argument that carries a call's :class:`PrefixState` down to the attention forks inside
#: torch.compile (see :func:`traced_state`), where the ContextVar cannot be read. transformers 5.x
#: hands a model's ``**kwargs`` through every stack and layer to each attention module unchanged.
STATE_KWARG = "_bpp_state"

# The model classes whose installed fork receives STATE_KWARG through every layer (set by the
# patcher): only their prefixed calls are traced under torch.compile; others run eagerly.
_TRACEABLE: frozenset = frozenset()


def set_traceable(classes: frozenset) -> None:
    """Record the model classes whose prefixed calls torch.compile may trace (see :func:`traceable`)."""
    global _TRACEABLE
    _TRACEABLE = frozenset(classes)


def traceable(model_class: type) -> bool:
    """Whether a prefixed call of ``model_class`` is traced by torch.compile (a module global: readable inside it)."""
    return model_class in _TRACEABLE


class PrefixState:
    """The resolved prefix of one model call.

    Args:
        slices: Attention module -> its ``(key, value)`` prefix.
        batch: The input batch size of the call (``None`` if unknown).
        expansions: Runtime batch multipliers the call may legitimately
            produce (beams, returned sequences); ``(1,)`` outside
            ``generate()``.
        owners: Modules whose calls are covered by this state (the core
            model, its encoder and decoder), so that nested entries of the
            same call reuse it instead of resolving again.
        visible: Attention module -> ``(prefix batch, prefix_len)`` bool
            visibility of its prefix columns, for modules whose rows do not
            all see every column (absent: every column visible).
    """

    __slots__ = ("slices", "batch", "expansions", "owners", "visible", "_expanded")

    def __init__(
        self,
        slices: dict[torch.nn.Module, KeyValue],
        batch: Optional[int],
        expansions: Iterable[int],
        owners: Iterable[torch.nn.Module],
        visible: Optional[dict[torch.nn.Module, torch.Tensor]] = None,
    ):
        self.slices = slices
        self.visible = visible or {}
        self.batch = batch
        self.expansions = tuple(sorted(set(expansions)))
        self.owners = frozenset(id(owner) for owner in owners)
        # (module, runtime batch) -> its PrefixKV, built once per call (kv_for runs in every layer on every step)
        self._expanded: dict[tuple[int, int], PrefixKV] = {}

    def tensors(self) -> list[torch.Tensor]:
        """Every prefix key and value, in a fixed order (see :meth:`with_tensors`)."""
        return [tensor for pair in self.slices.values() for tensor in pair]

    def with_tensors(self, tensors: Iterable[torch.Tensor]) -> "PrefixState":
        """The same state with its keys/values replaced, in :meth:`tensors` order."""
        tensors = list(tensors)
        clone = object.__new__(PrefixState)
        clone.slices = {module: (tensors[2 * i], tensors[2 * i + 1]) for i, module in enumerate(self.slices)}
        clone.batch, clone.expansions, clone.owners = self.batch, self.expansions, self.owners
        clone.visible = self.visible  # bool tensors, no gradient: need not be checkpoint inputs
        clone._expanded = {}
        return clone

    def covers(self, module: torch.nn.Module) -> bool:
        """Whether ``module``'s calls belong to this state's model."""
        return id(module) in self.owners

    def kv_for(self, module: torch.nn.Module, runtime_batch: int) -> Optional[PrefixKV]:
        """The prefix of ``module`` at the batch size it runs with, or None.

        A batch-1 prefix broadcasts with ``expand`` (no copy). A per-example
        prefix of batch B meeting a runtime batch of B*k (beam search,
        ``num_return_sequences``) is repeated per example, the same layout
        ``generate()`` uses for its own inputs; any other size is an error.
        The per-row visibility (if any) follows the same rule.
        """
        memo = (id(module), runtime_batch)
        # Outside torch.compile every result is kept for the rest of the call (kv_for runs in every
        # layer on every decoding step); traced code keeps only the repeat_interleave copies.
        eager = not torch.compiler.is_compiling()
        if eager:
            found = self._expanded.get(memo)
            if found is not None:
                return found
        pair = self.slices.get(module)
        if pair is None:
            return None
        key, value = pair
        visible = self.visible.get(module)
        prefix_batch = key.shape[0]
        if prefix_batch == runtime_batch:
            found = PrefixKV(key, value, visible)
        elif prefix_batch == 1:
            shape = (runtime_batch, *key.shape[1:])
            if visible is not None:
                visible = visible.expand(runtime_batch, -1)
            found = PrefixKV(key.expand(shape), value.expand(shape), visible)
        else:
            factor, remainder = divmod(runtime_batch, prefix_batch)
            if remainder or factor not in self.expansions:
                allowed = sorted({prefix_batch * k for k in self.expansions})
                raise PrefixError(
                    f"prefix batch {prefix_batch} does not fit the runtime batch {runtime_batch} "
                    f"(expected 1 or one of {allowed})"
                )
            expanded = self._expanded.get(memo)
            if expanded is None:
                if visible is not None:
                    visible = visible.repeat_interleave(factor, dim=0)
                expanded = PrefixKV(
                    key.repeat_interleave(factor, dim=0), value.repeat_interleave(factor, dim=0), visible
                )
                self._expanded[memo] = expanded
            return expanded
        if eager:
            self._expanded[memo] = found
        return found


def active_state() -> Optional[PrefixState]:
    """The state of the call in progress in this context, if any."""
    return _ACTIVE.get()


def prefixed_call_in_flight() -> bool:
    """Whether a prefixed call is running now in any thread (readable inside ``torch.compile``)."""
    return _ANY_IN_FLIGHT


def _count(delta: int) -> None:
    global _IN_FLIGHT, _ANY_IN_FLIGHT
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT += delta
        _ANY_IN_FLIGHT = _IN_FLIGHT > 0


def run_with_state(state: Optional[PrefixState], fn: Callable, *args, **kwargs):
    """Call ``fn`` with ``state`` published, restoring the previous one after."""
    token = _ACTIVE.set(state)
    counted = state is not None
    if counted:
        _count(1)
    try:
        return fn(*args, **kwargs)
    finally:
        if counted:
            _count(-1)
        _ACTIVE.reset(token)


def _checkpoint_with_state(checkpoint_func: Callable) -> Callable:
    """Wrap a layer's gradient-checkpoint function so recomputation sees the prefix.

    Backward re-runs a checkpointed layer after the call that published the
    state has returned, so the function being checkpointed carries the state
    with it. The prefix tensors travel as explicit checkpoint inputs rather
    than in a closure: reentrant checkpointing (the 4.x default) only returns
    gradients for its inputs, and backpropagating into a closure tensor's graph
    once per layer would fail on the second layer.
    """

    @functools.wraps(checkpoint_func)
    def checkpoint(function, *args, **kwargs):
        state = _ACTIVE.get()
        if state is None:
            return checkpoint_func(function, *args, **kwargs)
        count = len(args)

        def run(*inputs):
            return run_with_state(state.with_tensors(inputs[count:]), function, *inputs[:count])

        return checkpoint_func(run, *args, *state.tensors(), **kwargs)

    checkpoint._bpp_checkpoint = True
    return checkpoint


def ensure_checkpoint_binding(modules: Iterable[torch.nn.Module]) -> None:
    """Install :func:`_checkpoint_with_state` on modules that checkpoint."""
    for module in modules:
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not getattr(func, "_bpp_checkpoint", False):
            module._gradient_checkpointing_func = _checkpoint_with_state(func)
