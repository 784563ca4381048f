"""Threads: apply()/revert() racing each other, two models used alternately and at once, revert() mid-call.

A prefixed call publishes its prefix in a ContextVar (one per thread), so two models in two
threads never see each other's prefix; apply() and revert() serialise on one lock. A call in
flight while revert() removes the forks either completes with its prefix in every layer or
raises PatchNotAppliedError, never returns a result with the prefix in only some layers.
Expected values come from the plain-PyTorch reference (computed before any thread starts).
"""

from __future__ import annotations

import gc
import random
import sys
import threading
import weakref

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_greedy, reference_logits, tiny_model
from transformers.models.bart import modeling_bart

import bart_prefix_patch as bpp
from bart_prefix_patch import _guards, _registry
from bart_prefix_patch._state import active_state

NEW = 4
ATOL = 1e-4


@pytest.fixture
def fast_switching():
    """Switch threads every 10 us instead of 5 ms, so that calls really interleave."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def _run_threads(count: int, target) -> list[BaseException]:
    """Run ``target(index, barrier)`` in ``count`` threads; return the exceptions they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index):
        try:
            target(index, barrier)
        except BaseException as error:  # collected and reported by the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors


def _forks() -> dict:
    return {(p.target, p.attr): p.installed for p in _registry.installed("forks")}


def _assert_consistently_applied():
    """Applied: every fork is our wrapper. Reverted: every attribute is the exact original."""
    assert bpp.is_applied()
    installed = _forks()
    assert installed, "apply() installed no fork"
    for (owner, attr), wrapper in installed.items():
        assert owner.__dict__.get(attr) is wrapper, (owner, attr)
    bpp.revert()
    assert not _forks()
    for owner, attr in installed:
        # An inherited original (prepare_inputs_for_generation) comes back by removing ours from the class.
        assert vars(owner).get(attr, getattr(owner, attr)) is bpp.get_original(owner, attr), (owner, attr)
    assert bpp.apply(strict=True)
    assert set(_forks()) == set(installed)


def test_apply_and_revert_from_eight_threads(fast_switching):
    originals = len(_registry._ORIGINALS)
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=2)
    dec = target_batch(model.config)
    prefix = make_prefix(model.config, scale=2.0)
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)

    def toggle(index, barrier):
        order = random.Random(index)
        barrier.wait()
        for _ in range(25):
            if order.random() < 0.5:
                assert bpp.apply() is True
            else:
                bpp.revert()

    assert _run_threads(8, toggle) == []
    assert bpp.apply(strict=True)
    _assert_consistently_applied()
    assert len(_registry._ORIGINALS) == originals, "originals recorded again (a wrapper taken for an original?)"
    got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=ATOL)
    # And a reverted stock model is stock again: no prefix anywhere, calls without one still run.
    bpp.revert()
    plain = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(plain.double(), reference_logits(model, ids, dec, attention_mask=mask), atol=ATOL, rtol=ATOL)


@pytest.fixture
def two_models():
    """Model A with an attached prefix, model B without; inputs and the reference results of both."""
    a = tiny_model(seed=0, attn_implementation="eager")
    b = tiny_model(seed=1, attn_implementation="sdpa")
    prefix = make_prefix(a.config, scale=2.0)
    ids, mask = source_batch(a.config, pad_last=2)
    dec = target_batch(a.config)
    expected = {
        "a": (reference_logits(a, ids, dec, attention_mask=mask, prefix=prefix),
              reference_greedy(a, ids, NEW, attention_mask=mask, prefix=prefix).tolist()),
        "b": (reference_logits(b, ids, dec, attention_mask=mask),
              reference_greedy(b, ids, NEW, attention_mask=mask).tolist()),
    }
    bpp.attach(a, prefix)
    yield {"a": a, "b": b}, (ids, mask, dec), expected
    bpp.detach(a)


def _check_once(model, inputs, expected):
    ids, mask, dec = inputs
    logits = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(logits.double(), expected[0], atol=ATOL, rtol=ATOL)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=1, do_sample=False)
    assert tokens.tolist() == expected[1]


def test_two_models_called_alternately(two_models):
    models, inputs, expected = two_models
    for _ in range(3):
        for name in ("a", "b"):
            _check_once(models[name], inputs, expected[name])
    assert active_state() is None


def test_two_models_in_two_threads(two_models, fast_switching):
    models, inputs, expected = two_models
    names = ("a", "b")

    def work(index, barrier):
        barrier.wait()
        for _ in range(6):
            _check_once(models[names[index]], inputs, expected[names[index]])
        assert active_state() is None

    assert _run_threads(2, work) == []
    assert active_state() is None
    assert bpp.attached(models["b"]) is None and bpp.attached(models["a"]) is not None


def test_threads_keep_no_model_or_prefix_alive():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    prefix = make_prefix(model.config)
    ids, mask = source_batch(model.config)
    bpp.attach(model, prefix)

    def work(index, barrier):
        barrier.wait()
        model(ids, attention_mask=mask, decoder_input_ids=target_batch(model.config))
        model.generate(ids, attention_mask=mask, max_new_tokens=2)

    assert _run_threads(2, work) == []
    references = [weakref.ref(model), weakref.ref(prefix.decoder[0][0])]
    del model, prefix, work
    gc.collect()
    assert [reference() for reference in references] == [None, None], "something kept the model or prefix alive"


class _RevertAt:
    """A forward hook that calls bpp.revert() on its n-th call (mid-way through a model call)."""

    def __init__(self, nth: int):
        self.nth, self.calls = nth, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.nth:
            bpp.revert()


def test_revert_during_forward_raises_instead_of_a_mixed_result():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config)
    dec = target_batch(model.config)
    prefix = make_prefix(model.config, scale=2.0)
    # After the first decoder layer: the later decoder layers would run without their prefix.
    handle = model.model.decoder.layers[0].register_forward_hook(_RevertAt(1))
    try:
        with pytest.raises(bpp.PatchNotAppliedError, match=r"revert\(\) ran while .* in flight"):
            model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix)
    finally:
        handle.remove()
    assert not bpp.is_applied() and active_state() is None


def test_revert_during_generate_raises_instead_of_a_mixed_result():
    model = tiny_model(seed=0, attn_implementation="eager")
    ids, mask = source_batch(model.config)
    prefix = make_prefix(model.config, scale=2.0)
    bpp.attach(model, prefix)
    handle = model.model.decoder.layers[1].register_forward_hook(_RevertAt(2))  # during the second step
    try:
        # The next decoding step is refused at its entry, or the finished call is discarded.
        with pytest.raises(bpp.PatchNotAppliedError, match=r"not applied|revert\(\) ran while"):
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, do_sample=False)
    finally:
        handle.remove()
        bpp.apply()
        bpp.detach(model)


class _RevertAtLine:
    """A ``sys.settrace`` tracer that runs ``bpp.revert()`` before the nth line executed in the entry guards' module.

    With ``nth=0`` it only counts the lines. Frames of other files are not traced line by line.
    """

    def __init__(self, nth: int):
        self.nth, self.lines = nth, 0

    def __call__(self, frame, event, arg):
        return self._line if frame.f_code.co_filename == _guards.__file__ else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.nth:
                bpp.revert()
        return self._line


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_revert_before_any_line_of_the_entry_guards_never_returns_a_result_without_the_prefix(call):
    """Every interleaving, at line granularity, of one revert() with a prefixed call's entry guards.

    The thread race above meets each point only by chance (a revert between the guard's two reads
    of the patch state once let a greedy generate() run stock code without its prefix); here the
    revert lands before each line the guards execute, one call per line.
    """
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=1)
    dec = target_batch(model.config)
    prefix = make_prefix(model.config, scale=2.0)
    new = 2
    if call == "forward":
        want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)

        def run_and_check():
            got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
            torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=ATOL)
    else:
        want_tokens = reference_greedy(model, ids, new, attention_mask=mask, prefix=prefix).tolist()

        def run_and_check():
            tokens = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=new, num_beams=1,
                                    do_sample=False)
            assert tokens.tolist() == want_tokens

    def traced(tracer):
        sys.settrace(tracer)
        try:
            run_and_check()
        finally:
            sys.settrace(None)
            bpp.apply()

    counter = _RevertAtLine(0)
    traced(counter)  # no revert: the whole result, and the number of guard lines
    assert counter.lines > 10
    refused = 0
    for nth in range(1, counter.lines + 1):
        try:
            traced(_RevertAtLine(nth))
        except bpp.PatchNotAppliedError:
            refused += 1
    # A revert before the guard's last lines (after its final check) leaves a whole result.
    assert 0 < refused < counter.lines
    _assert_consistently_applied()


def test_calls_in_flight_while_another_thread_reverts(fast_switching):
    """Each prefixed call returns the full-prefix result or raises PatchNotAppliedError, nothing else."""
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=1)
    dec = target_batch(model.config)
    prefix = make_prefix(model.config, scale=2.0)
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)
    want_tokens = reference_greedy(model, ids, NEW, attention_mask=mask, prefix=prefix).tolist()
    outcomes = {"whole": 0, "refused": 0}
    stop = threading.Event()

    def caller(index, barrier):
        barrier.wait()
        try:
            for step in range(30):
                try:
                    if step % 3:
                        got = model(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
                        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=ATOL)
                    else:
                        tokens = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW,
                                                num_beams=1, do_sample=False)
                        assert tokens.tolist() == want_tokens
                    outcomes["whole"] += 1
                except bpp.PatchNotAppliedError:
                    outcomes["refused"] += 1
        finally:
            stop.set()

    def toggler(index, barrier):
        barrier.wait()
        while not stop.is_set():
            bpp.revert()
            bpp.apply()

    errors = _run_threads(2, lambda index, barrier: (caller if index == 0 else toggler)(index, barrier))
    assert errors == []
    assert outcomes["whole"] + outcomes["refused"] == 30
    assert bpp.apply(strict=True)
    _assert_consistently_applied()
    assert modeling_bart.BartAttention.__dict__["forward"] is _forks()[(modeling_bart.BartAttention, "forward")]
