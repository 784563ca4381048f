"""torch.compile of prefixed calls: training steps and generate() compile, equal to the reference.

On transformers 5.x the attention forks take the call's state as a keyword
argument that every layer hands down, so a prefixed call is traced into one
graph (the entry resolves the prefix outside it). Where a release's fork
cannot (4.x), the call runs eagerly under torch.compile and must still be
right. Counts, not times: benchmarks/bench_compile.py --prefix 20 measures
speed. The tests compile with ``aot_eager`` (dynamo and AOTAutograd trace
exactly what inductor would receive, without minutes of C++ codegen).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from conftest import fresh_dynamo, make_prefix, source_batch, target_batch
from reference import _decode, _encode, _extract_weights, reference_greedy, reference_logits, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import BartForConditionalGeneration
from transformers.models.bart.modeling_bart import shift_tokens_right

import bart_prefix_patch as bpp
from bart_prefix_patch import _state

#: Whether the installed release traces prefixed BART calls (5.4+); on 4.x and 5.0 - 5.3 they run eagerly.
TRACED = _state.traceable(BartForConditionalGeneration)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    fresh_dynamo()
    yield
    torch._dynamo.reset()


def _trainable(prefix: bpp.Prefix) -> list[torch.Tensor]:
    leaves = [tensor for site in (prefix.encoder, prefix.decoder, prefix.cross) for pair in site for tensor in pair]
    for tensor in leaves:
        tensor.requires_grad_(True)
    return leaves


def _reference_loss(model, ids, mask, labels, prefix) -> torch.Tensor:
    """Cross-entropy of the plain-PyTorch reference in float64, differentiable in the prefix."""
    config = model.config
    weights = _extract_weights(model, torch.float64)
    decoder_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    encoded, encoded_mask = _encode(weights, ids, mask, prefix)
    logits = _decode(weights, encoded, encoded_mask, decoder_ids, None, prefix)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _training_setup(pad_last: int):
    """A frozen tiny BART, a padded batch with labels, and a trainable prefix with its leaves."""
    model = tiny_model(seed=0, attn_implementation="sdpa").requires_grad_(False)
    ids, mask = source_batch(model.config, pad_last=pad_last)
    prefix = make_prefix(model.config, scale=2.0)
    return model, ids, mask, target_batch(model.config), prefix, _trainable(prefix)


def test_compiled_training_step_matches_reference():
    model, ids, mask, labels, prefix, leaves = _training_setup(pad_last=2)
    want_loss = _reference_loss(model, ids, mask, labels, prefix)
    want = torch.autograd.grad(want_loss, leaves)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for step in range(2):  # the second step reuses the graph
        loss = compiled(ids, attention_mask=mask, labels=labels, prefix=prefix).loss
        got = torch.autograd.grad(loss, leaves)
        torch.testing.assert_close(loss.double(), want_loss, atol=1e-4, rtol=1e-4)
        for index, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3, msg=lambda m, i=index: f"leaf {i}: {m}")
    if TRACED:
        assert counter.frame_count == 1, f"a prefixed step compiled {counter.frame_count} graphs, expected 1"
        # the prefix is inside the graph: its keys/values are graph inputs, not run eagerly
        assert counter.op_count > 0


def test_prefixed_forward_is_one_graph():
    if not TRACED:
        pytest.skip("this release runs prefixed calls eagerly under torch.compile (docs/how-it-works.md)")
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=1)
    dec = target_batch(model.config)
    explained = torch._dynamo.explain(model)(ids, attention_mask=mask, decoder_input_ids=dec,
                                             prefix=make_prefix(model.config))
    reasons = [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1, reasons
    assert explained.graph_break_count == 0, reasons


def test_a_new_prefix_every_call_does_not_recompile():
    """A prefix module's output is a new tensor each step; the graph must not be keyed on it."""
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config)
    dec = target_batch(model.config)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    for seed in range(2):
        prefix = make_prefix(model.config, scale=2.0, seed=seed)
        got = compiled(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
        torch.testing.assert_close(got.double(), reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix),
                                   atol=1e-4, rtol=1e-4)
    plain = compiled(ids, attention_mask=mask, decoder_input_ids=dec).logits  # and without a prefix
    torch.testing.assert_close(plain.double(), reference_logits(model, ids, dec, attention_mask=mask),
                               atol=1e-4, rtol=1e-4)
    if TRACED:
        assert counter.frame_count == 2, f"{counter.frame_count} graphs for 2 prefixes and 1 plain call, expected 2"


def test_compiled_forward_generates_as_eager():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=2)
    prefix = make_prefix(model.config, scale=2.0)
    beam = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    eager_beam = model.generate(ids, attention_mask=mask, prefix=prefix, **beam)

    model.forward = torch.compile(model.forward, backend="eager")
    greedy = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(greedy, reference_greedy(model, ids, 5, attention_mask=mask, prefix=prefix))
    assert torch.equal(model.generate(ids, attention_mask=mask, prefix=prefix, **beam), eager_beam)


def test_compiled_prefixed_generate_never_leaves_the_graph():
    """On 5.4+ each decoding step's model inputs carry the call's state: no graph break per step."""
    if not TRACED:
        pytest.skip("this release runs prefixed calls eagerly under torch.compile (docs/how-it-works.md)")
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=2)
    want = {seed: reference_greedy(model, ids, 5, attention_mask=mask, prefix=make_prefix(model.config, scale=2.0,
                                                                                        seed=seed))
            for seed in (0, 1)}
    model.forward = torch.compile(model.forward, backend="eager")
    counters.clear()
    for seed in (0, 1):  # a new prefix (and state) per call: traced again, not broken
        prefix = make_prefix(model.config, scale=2.0, seed=seed)
        got = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(got, want[seed])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def _steps_carrying_the_state(model, **generate_kwargs) -> list[bool]:
    """Run generate(); for each call of ``model.forward``, whether its inputs carried the state keyword."""
    seen, forward = [], model.forward

    def spy(*args, **kwargs):
        seen.append(_state.STATE_KWARG in kwargs)
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        model.generate(**generate_kwargs)
    finally:
        del model.forward
    return seen


def test_step_inputs_carry_the_state_only_in_a_prefixed_generate():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, pad_last=1)
    prefix = make_prefix(model.config, scale=2.0)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prefixed = _steps_carrying_the_state(model, prefix=prefix, num_beams=2, **call)
    assert len(prefixed) == 4 and all(carried == TRACED for carried in prefixed), prefixed
    assert not any(_steps_carrying_the_state(model, **call))  # no prefix: the upstream inputs
    model.gradient_checkpointing_enable()  # recomputation reads the ContextVar: the state stays out
    try:
        assert not any(_steps_carrying_the_state(model, prefix=prefix, **call))
    finally:
        model.gradient_checkpointing_disable()


def test_compiled_calls_with_a_trainable_prefix_under_no_grad_match_reference():
    """A prefix straight from training (tensors that require grad), served under no_grad, compiled."""
    model = tiny_model(seed=0, attn_implementation="sdpa").requires_grad_(False)
    ids, mask = source_batch(model.config, pad_last=2)
    prefix = make_prefix(model.config, scale=2.0)
    leaves = _trainable(prefix)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    dec = target_batch(model.config)
    with torch.no_grad():
        logits = compiled(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
    torch.testing.assert_close(logits.double(), reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix),
                               atol=1e-4, rtol=1e-4)
    model.forward = torch.compile(model.forward, backend=counter)
    got = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(got, reference_greedy(model, ids, 5, attention_mask=mask, prefix=prefix))
    assert all(leaf.requires_grad and leaf.grad is None for leaf in leaves)  # left as they were
    if TRACED:
        assert counter.frame_count > 0


def test_mixed_batch_compiles_and_matches_each_example_alone():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids, mask = source_batch(model.config, batch=3, pad_last=2)
    dec = target_batch(model.config, batch=3)
    short = make_prefix(model.config, scale=2.0, seed=1, enc_len=2, dec_len=1, cross_len=3)
    long = make_prefix(model.config, scale=2.0, seed=2)
    entries = [long, None, short]
    got = torch.compile(model, backend="eager")(ids, attention_mask=mask, decoder_input_ids=dec,
                                                prefix=bpp.Prefix.stack(entries)).logits
    for row, entry in enumerate(entries):
        want = reference_logits(model, ids[row:row + 1], dec[row:row + 1], attention_mask=mask[row:row + 1],
                                prefix=entry)
        torch.testing.assert_close(got[row:row + 1].double(), want, atol=1e-4, rtol=1e-4, msg=f"row {row}")


def test_gradient_checkpointing_under_compile_runs_eagerly_and_right():
    model, ids, mask, labels, prefix, leaves = _training_setup(pad_last=1)
    want = torch.autograd.grad(_reference_loss(model, ids, mask, labels, prefix), leaves)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        loss = torch.compile(model, backend="eager")(ids, attention_mask=mask, labels=labels, prefix=prefix).loss
        got = torch.autograd.grad(loss, leaves)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
