"""Decoding steps join the prefix to the scores, not the keys/values (``forks._decoding.split_attention``).

Checked against a plain float64 attention over the concatenated keys
written here, then end to end: a cached decoding step (the split path) gives
what the full forward (the joined path, itself checked against
``reference.py``) gives, probabilities included, and in bfloat16 too.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_logits, tiny_model

from bart_prefix_patch._state import PrefixKV
from bart_prefix_patch.forks._decoding import plain_attention, split_attention, splits_scores

BATCH, HEADS, KEYS, PREFIX, DIM = 3, 2, 5, 4, 8


def _plain_attention(query, keys, values, prefix_key, prefix_value, mask, visible, head_mask, scaling):
    """Softmax attention of ``query`` over ``[prefix ; keys]``, in float64, one row at a time."""
    outputs, probabilities = [], []
    for row in range(query.shape[0]):
        pk, pv = prefix_key[min(row, prefix_key.shape[0] - 1)], prefix_value[min(row, prefix_value.shape[0] - 1)]
        k = torch.cat([pk, keys[row]], dim=1).double()
        v = torch.cat([pv, values[row]], dim=1).double()
        scores = query[row].double() @ k.transpose(1, 2) * scaling  # (heads, queries, prefix + keys)
        additive = torch.zeros(scores.shape[-1], dtype=torch.float64)
        if visible is not None:
            additive[:PREFIX][~visible[row]] = float("-inf")
        if mask is not None:
            m = mask[min(row, mask.shape[0] - 1), 0, 0]
            m = torch.where(m, 0.0, float("-inf")).double() if m.dtype == torch.bool else m.double()
            additive[-m.shape[0]:] += m  # over the real keys, or over prefix and keys
        p = torch.softmax(scores + additive, dim=-1)
        if head_mask is not None:
            p = p * head_mask.double()[:, None, None]
        probabilities.append(p)
        outputs.append(p @ v)
    return torch.stack(outputs), torch.stack(probabilities)


def _inputs(layout, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, HEADS, 1, DIM, generator=g)
    keys, values = (torch.randn(BATCH, HEADS, KEYS, DIM, generator=g) for _ in range(2))
    rows = BATCH if layout == "per-row" else 1
    prefix_key, prefix_value = (torch.randn(rows, HEADS, PREFIX, DIM, generator=g) for _ in range(2))
    if layout == "expanded":  # what PrefixState.kv_for hands a batch-1 prefix at runtime batch 3
        prefix_key, prefix_value = (t.expand(BATCH, -1, -1, -1) for t in (prefix_key, prefix_value))
    padded = torch.ones(BATCH, 1, 1, KEYS, dtype=torch.bool)
    padded[-1, ..., :2] = False  # a left-padded last row
    mask = {
        None: None,
        "bool": padded,
        "float": torch.zeros(padded.shape).masked_fill(~padded, torch.finfo(torch.float32).min),
        "float over prefix and keys": torch.cat(
            [torch.zeros(BATCH, 1, 1, PREFIX), torch.randn(BATCH, 1, 1, KEYS, generator=g)], dim=-1
        ),
    }[mask_kind]
    return query, keys, values, prefix_key, prefix_value, mask


@pytest.mark.parametrize(
    "layout,mask_kind,with_visible",
    list(itertools.product(["batch-1", "expanded", "per-row"],
                           [None, "bool", "float", "float over prefix and keys"], [False, True])),
)
def test_matches_plain_attention_over_joined_keys(layout, mask_kind, with_visible):
    query, keys, values, prefix_key, prefix_value, mask = _inputs(layout, mask_kind)
    visible = None
    if with_visible:  # a stacked prefix: row 0 sees all 4 columns, row 1 the first 2, row 2 none
        visible = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    want_out, want_p = _plain_attention(query, keys, values, prefix_key, prefix_value, mask, visible, None, 0.3)
    got_out, got_p = split_attention(query, keys, values, PrefixKV(prefix_key, prefix_value, visible), mask, 0.3)
    torch.testing.assert_close(got_out.double(), want_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_p.double(), want_p, atol=1e-6, rtol=0)
    assert (want_p[..., :PREFIX] > 1e-3).any(), "the prefix visibly takes part"


@pytest.mark.parametrize("layout", ["batch-1", "per-row"])
def test_head_mask_and_bfloat16(layout):
    query, keys, values, prefix_key, prefix_value, mask = _inputs(layout, "bool", seed=1)
    head_mask = torch.tensor([1.0, 0.5])
    want_out, want_p = _plain_attention(query, keys, values, prefix_key, prefix_value, mask, None, head_mask, 0.3)
    got_out, got_p = split_attention(query, keys, values, (prefix_key, prefix_value), mask, 0.3, head_mask=head_mask)
    torch.testing.assert_close(got_out.double(), want_out, atol=1e-5, rtol=0)
    half = [t.bfloat16() for t in (query, keys, values)]
    got_out, got_p = split_attention(*half, (prefix_key, prefix_value), mask, 0.3)  # the fp32 prefix is cast
    assert got_out.dtype == got_p.dtype == torch.bfloat16
    want_out, _ = _plain_attention(*half, prefix_key, prefix_value, mask, None, None, 0.3)
    torch.testing.assert_close(got_out.double(), want_out, atol=3e-2, rtol=0)


def test_a_mask_of_the_wrong_width_names_both_widths():
    query, keys, values, prefix_key, prefix_value, _ = _inputs("batch-1", None)
    with pytest.raises(RuntimeError, match=r"covers 3 keys, expected 5 or 9 \(4 prefix columns\)"):
        split_attention(query, keys, values, (prefix_key, prefix_value), torch.ones(1, 1, 1, 3, dtype=torch.bool), 1.0)


def test_cached_step_probabilities_equal_the_full_forward_row(decoding_path):
    """Eager output_attentions of a decoding step: the full forward's last row, prefix columns included."""
    model = tiny_model(seed=0, attn_implementation="eager")
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config, length=5)
    prefix = make_prefix(config, dec_len=4)
    full = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids, prefix=prefix, output_attentions=True)
    first = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, :4], prefix=prefix, use_cache=True)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    step = model(
        attention_mask=mask, decoder_input_ids=decoder_ids[:, 4:], encoder_outputs=(first.encoder_last_hidden_state,),
        past_key_values=cache, prefix=prefix, use_cache=True, output_attentions=True,
    )
    for got, want in zip(step.decoder_attentions, full.decoder_attentions):
        assert got.shape == (2, config.decoder_attention_heads, 1, 4 + 5)
        torch.testing.assert_close(got, want[:, :, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(step.logits, full.logits[:, -1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_bfloat16_decoding_step_matches_the_reference(implementation, decoding_path):
    model = tiny_model(seed=0, attn_implementation=implementation)
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config, length=5)
    prefix = make_prefix(config)
    want = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=prefix)[:, -1:]
    model = model.to(torch.bfloat16)  # the float32 prefix is cast to the model's dtype
    with torch.no_grad():
        first = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, :4], prefix=prefix, use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        step = model(
            attention_mask=mask, decoder_input_ids=decoder_ids[:, 4:],
            encoder_outputs=(first.encoder_last_hidden_state,), past_key_values=cache, prefix=prefix, use_cache=True,
        )
    assert step.logits.dtype == torch.bfloat16
    assert (step.logits.double() - want).abs().max().item() < 0.05 * want.abs().max().item()


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_plain_attention_matches_plain_attention_over_joined_keys(mask_kind):
    """Cross-attention's decoding steps: eager math over the cached [prefix ; encoder] keys, any mask kind."""
    query, keys, values, prefix_key, prefix_value, mask = _inputs("per-row", mask_kind, seed=2)
    want_out, _ = _plain_attention(query, keys, values, prefix_key, prefix_value, mask, None, None, 0.3)
    joined_keys, joined_values = torch.cat([prefix_key, keys], 2), torch.cat([prefix_value, values], 2)
    if mask is not None:  # a mask over the joined keys, as prefixed_mask builds it
        fill = torch.ones if mask.dtype == torch.bool else torch.zeros
        mask = torch.cat([fill(BATCH, 1, 1, PREFIX, dtype=mask.dtype), mask], dim=-1)
    got = plain_attention(query, joined_keys, joined_values, mask, 0.3)
    torch.testing.assert_close(got.double(), want_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch,length,dtype", [(1, 1, torch.bfloat16), (1, 20, torch.float32), (4, 80, torch.float32)])
def test_self_attention_decoding_steps_split_every_prefix_by_default(batch, length, dtype):
    """The size rule's default: every non-empty prefix joins the scores (measured faster inside generate())."""
    key = torch.zeros(1, 12, length, 64, dtype=dtype).expand(batch, -1, -1, -1)  # a batch-1 prefix, expanded
    assert splits_scores(PrefixKV(key, key))


def test_the_size_rule_counts_the_prefix_bytes_at_the_runtime_batch(monkeypatch):
    """Raised, the threshold sends small prefixes (batch x length x width x dtype) to the keys/values join."""
    from bart_prefix_patch.forks import _decoding

    monkeypatch.setattr(_decoding, "SPLIT_MIN_BYTES", 160 * 1024)
    for batch, length, dtype, splits in [(1, 20, torch.float32, False), (4, 20, torch.float32, True),
                                         (1, 80, torch.float32, True), (2, 20, torch.bfloat16, False)]:
        key = torch.zeros(1, 12, length, 64, dtype=dtype).expand(batch, -1, -1, -1)
        assert splits_scores(PrefixKV(key, key)) is splits, (batch, length, dtype)


def test_only_cross_attention_steps_take_plain_attention(decoding_path, monkeypatch):
    """sdpa decoding steps: cross-attention runs plain_attention over [prefix ; encoder]; self-attention never does.

    Self-attention over its short cache is faster in sdpa (docs/benchmarks.md, section 6), whether it
    joins the keys/values or the scores.
    """
    import importlib

    model = tiny_model(seed=0, attn_implementation="sdpa")
    config = model.config
    ids, mask = source_batch(config)
    new = 4
    key_lengths = []
    for name in ("bart_v5", "bart_v4_cache"):
        try:
            fork = importlib.import_module(f"bart_prefix_patch.forks.{name}")
        except ImportError:  # a fork module of other releases
            continue
        plain = fork.plain_attention

        def counted(query, keys, *args, plain=plain, **kwargs):
            key_lengths.append(keys.shape[2])
            return plain(query, keys, *args, **kwargs)

        monkeypatch.setattr(fork, "plain_attention", counted)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, prefix=make_prefix(config, cross_len=5), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, num_beams=1)
    if not key_lengths:
        pytest.skip("this release's fork has no decoding-step path (4.44 - 4.52)")
    assert key_lengths == [5 + ids.shape[1]] * (config.decoder_layers * new)


def test_the_prefix_operands_are_kept_for_the_call_and_follow_dtype_and_scaling():
    """A PrefixKV (one per module and call) keeps its bmm operands; a new dtype or scaling rebuilds them."""
    query, keys, values, prefix_key, prefix_value, mask = _inputs("per-row", "bool", seed=3)
    prefix_kv = PrefixKV(prefix_key, prefix_value)
    for scaling in (0.3, 0.3, 0.7):  # the second call reuses the first's operands, the third must not
        want_out, _ = _plain_attention(query, keys, values, prefix_key, prefix_value, mask, None, None, scaling)
        got_out, _ = split_attention(query, keys, values, prefix_kv, mask, scaling)
        torch.testing.assert_close(got_out.double(), want_out, atol=1e-5, rtol=0)
        assert prefix_kv._operands is not None
    half = [t.bfloat16() for t in (query, keys, values)]
    got_out, _ = split_attention(*half, prefix_kv, mask, 0.7)  # the float32 operands are not reused in bfloat16
    assert got_out.dtype == torch.bfloat16
    want_out, _ = _plain_attention(*half, prefix_key, prefix_value, mask, None, None, 0.7)
    torch.testing.assert_close(got_out.double(), want_out, atol=3e-2, rtol=0)


def test_plain_attention_broadcasts_keys_shared_by_every_row():
    """Keys/values of batch 1 (as a caller may broadcast them) meet every row's query."""
    query, keys, values, prefix_key, prefix_value, _ = _inputs("batch-1", None, seed=4)
    keys, values = keys[:1], values[:1]
    want_out, _ = _plain_attention(query, keys.expand(BATCH, -1, -1, -1), values.expand(BATCH, -1, -1, -1),
                                   prefix_key, prefix_value, None, None, None, 0.3)
    got = plain_attention(query, torch.cat([prefix_key, keys], 2), torch.cat([prefix_value, values], 2), None, 0.3)
    torch.testing.assert_close(got.double(), want_out, atol=1e-5, rtol=0)


def test_plain_attention_keeps_the_key_operands_only_for_the_same_tensors():
    """Cross-attention's steps reuse the operands of the same cached keys; other keys get their own."""
    query, keys, values, prefix_key, prefix_value, mask = _inputs("per-row", "bool", seed=5)
    fill = torch.ones(BATCH, 1, 1, PREFIX, dtype=torch.bool)
    mask = torch.cat([fill, mask], dim=-1)
    keep = PrefixKV(prefix_key[:, :, :0], prefix_value[:, :, :0])
    for scale in (1.0, 1.0, -1.0):  # the third call's keys are new tensors: their operands, not the kept ones
        k, v = torch.cat([prefix_key, keys * scale], 2), torch.cat([prefix_value, values * scale], 2)
        want_out, _ = _plain_attention(query, keys * scale, values * scale, prefix_key, prefix_value, mask[..., PREFIX:],
                                       None, None, 0.3)
        torch.testing.assert_close(plain_attention(query, k, v, mask, 0.3, keep=keep).double(), want_out, atol=1e-5, rtol=0)
        assert keep._key_operands[0] is k
        torch.testing.assert_close(plain_attention(query, k, v, mask, 0.3, keep=keep).double(), want_out, atol=1e-5, rtol=0)
