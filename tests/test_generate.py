"""Stock generate() with prefixes, against the reference's decoding."""

from __future__ import annotations

import pytest
import torch
import transformers.cache_utils
from conftest import make_prefix, source_batch
from reference import reference_greedy, reference_sequence_logprob
from torch.utils._python_dispatch import TorchDispatchMode

import bart_prefix_patch as bpp

NEW = 6


class CountingPrefix(torch.nn.Module):
    """A trainable module returning a fixed-structure Prefix; counts its calls."""

    def __init__(self, prefix: bpp.Prefix):
        super().__init__()
        self.calls = 0
        self.params = torch.nn.ParameterDict()
        for site in bpp.Prefix.__dataclass_fields__:
            for index, (key, value) in enumerate(getattr(prefix, site) or []):
                self.params[f"{site}_{index}_k"] = torch.nn.Parameter(key.clone())
                self.params[f"{site}_{index}_v"] = torch.nn.Parameter(value.clone())
        self.layout = {site: len(getattr(prefix, site) or []) for site in bpp.Prefix.__dataclass_fields__}
        # Outputs are computed (non-leaf) tensors, like a reparameterised prefix's.
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self) -> bpp.Prefix:
        self.calls += 1
        sites = {
            site: [
                (self.params[f"{site}_{i}_k"] * self.scale, self.params[f"{site}_{i}_v"] * self.scale)
                for i in range(n)
            ]
            or None
            for site, n in self.layout.items()
        }
        return bpp.Prefix(**sites)


def _greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=1, **kwargs)


@pytest.mark.parametrize("prefix_batch", [1, 2])
def test_greedy_matches_reference(model, prefix_batch, decoding_path):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    prefix = make_prefix(config, batch=prefix_batch, scale=2.0)
    got = _greedy(model, ids, mask, prefix=prefix)
    want = reference_greedy(model, ids, NEW, attention_mask=mask, prefix=prefix)
    assert got.tolist() == want.tolist()
    assert got.tolist() != _greedy(model, ids, mask).tolist(), "the prefix must change the output"


def test_greedy_attached_and_seed_spelling_match_per_call(model):
    config = model.config
    ids, mask = source_batch(config)
    prefix = make_prefix(config, scale=2.0)
    per_call = _greedy(model, ids, mask, prefix=prefix)
    assert _greedy(model, ids, mask, past_key_values=prefix).tolist() == per_call.tolist()
    bpp.attach(model, prefix)
    try:
        assert _greedy(model, ids, mask).tolist() == per_call.tolist()
    finally:
        bpp.detach(model)
    module = CountingPrefix(prefix)
    bpp.attach(model, module)
    try:
        module.calls = 0
        assert _greedy(model, ids, mask).tolist() == per_call.tolist()
        assert module.calls == 1, "an attached module runs once per generate() call"
        module.calls = 0
        model(ids, attention_mask=mask, decoder_input_ids=per_call)
        assert module.calls == 1, "an attached module runs once per forward"
    finally:
        bpp.detach(model)
    assert _greedy(model, ids, mask).tolist() != per_call.tolist()


@pytest.mark.parametrize("prefix_batch", [1, 2])
def test_beam_scores_equal_teacher_forced_logprob(model, prefix_batch, decoding_path):
    config = model.config
    ids, mask = source_batch(config, pad_last=1)
    prefix = make_prefix(config, batch=prefix_batch, scale=2.0)
    out = model.generate(
        ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW, num_beams=3, num_return_sequences=2,
        length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    expanded_ids = ids.repeat_interleave(2, dim=0)
    expanded_mask = mask.repeat_interleave(2, dim=0)
    expanded = prefix
    if prefix_batch > 1:
        expanded = bpp.Prefix(
            **{
                site: [(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)) for k, v in getattr(prefix, site)]
                for site in ("encoder", "decoder", "cross")
            }
        )
    want = reference_sequence_logprob(model, expanded_ids, out.sequences, attention_mask=expanded_mask, prefix=expanded)
    torch.testing.assert_close(out.sequences_scores.double(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False, num_beams=1),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=0, num_return_sequences=2),
    ],
    ids=["greedy", "beam", "sample"],
)
@pytest.mark.parametrize("prefix_batch", [1, 2])
def test_cache_equals_no_cache(model, kwargs, prefix_batch, decoding_path):
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    prefix = make_prefix(config, batch=prefix_batch, scale=2.0)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(
            model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW, use_cache=use_cache, **kwargs)
        )
    assert runs[0].tolist() == runs[1].tolist()


def test_padded_batch_equals_one_at_a_time(model, decoding_path):
    config = model.config
    ids, mask = source_batch(config, batch=3, pad_last=3)
    prefix = make_prefix(config, batch=3, scale=2.0)
    for kwargs in (dict(num_beams=1), dict(num_beams=3)):
        batched = model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=NEW, do_sample=False, **kwargs)
        for row in range(3):
            keep = mask[row].bool()
            single_prefix = bpp.Prefix(
                **{
                    site: [(k[row : row + 1], v[row : row + 1]) for k, v in getattr(prefix, site)]
                    for site in ("encoder", "decoder", "cross")
                }
            )
            single = model.generate(
                ids[row : row + 1, keep], prefix=single_prefix, max_new_tokens=NEW, do_sample=False, **kwargs
            )
            n = single.shape[1]
            assert batched[row, :n].tolist() == single[0].tolist()
            assert (batched[row, n:] == config.pad_token_id).all()


def test_prefix_batch_must_match_input(model):
    config = model.config
    ids, mask = source_batch(config, batch=2)
    prefix = make_prefix(config, batch=3)
    with pytest.raises(bpp.PrefixError, match="batch"):
        model.generate(ids, attention_mask=mask, prefix=prefix, max_new_tokens=2)


def test_static_cache_is_refused(model):
    config = model.config
    ids, mask = source_batch(config)
    with pytest.raises(bpp.UnsupportedConfigurationError, match="static"):
        model.generate(ids, prefix=make_prefix(config), max_new_tokens=2, cache_implementation="static")


def test_generate_without_prefix_is_stock(model):
    config = model.config
    ids, mask = source_batch(config, pad_last=1)
    patched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2)
    bpp.revert()
    stock = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2)
    assert patched.tolist() == stock.tolist()


def _layer0_keys(cache) -> torch.Tensor:
    return cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]


def test_reorder_cache_outside_a_prefixed_call_is_upstream():
    """Only a prefixed generate() skips reordering the (beam-invariant) cross cache; other calls reorder both."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    rows = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 3, 1).contiguous()
    cache.self_attention_cache.update(rows, rows, 0)
    cache.cross_attention_cache.update(rows, rows, 0)
    cache.reorder_cache(torch.tensor([1, 1]))
    for part in (cache.self_attention_cache, cache.cross_attention_cache):
        assert _layer0_keys(part)[:, 0, 0, 0].tolist() == [1.0, 1.0]


class _KeyCopies(TorchDispatchMode):
    """Records the output shape of every concatenation along the key axis (dim 2) of 4-D float tensors."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default:
            dim = args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0)
            if out.dim() == 4 and out.is_floating_point() and dim % 4 == 2 and out.numel():
                self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.skipif(not hasattr(transformers.cache_utils, "DynamicLayer"), reason="caches made of layers: 4.54+")
@pytest.mark.parametrize("beams", [1, 2])
def test_prefixed_generate_copies_what_stock_copies_plus_the_prefix(model, beams, decoding_path):
    """A prefixed generate() copies the keys/values stock copies, with the prefix rows in front where it joins them.

    Decoder self-attention copies exactly what stock's cache update copies,
    [cache ; new], and never the prefix where its decoding steps join the
    scores ("split"); where they join the keys/values ("join", small
    prefixes) it copies [prefix ; cache ; new] in that one concatenation
    instead of stock's, never a second time. Cross-attention caches [prefix ; encoder] where
    stock caches the encoder projections, in one copy as stock (the cache
    update must not copy the joined keys a second time); the encoder joins
    [prefix ; keys] once per layer, where stock copies nothing.
    """
    config = model.config
    source = NEW + 3  # longer than any self-attention cache, so stock's copies tell the two sites apart
    ids, mask = source_batch(config, length=source, pad_last=1)
    prefix = make_prefix(config)
    lengths = {site: getattr(prefix, site)[0][0].shape[2] for site in ("encoder", "decoder", "cross")}
    assert len(set(lengths.values())) == 3, "distinct lengths per site, so a copy's site shows in its shape"

    def copies(**kwargs):
        with torch.no_grad(), _KeyCopies() as record:
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=beams,
                           do_sample=False, **kwargs)
        return sorted(record.shapes)

    prefixed = copies(prefix=prefix)
    bpp.revert()
    stock = copies()
    assert stock, "stock generate() copies keys/values into its cache"
    heads = config.encoder_attention_heads
    encoder_joins = [(ids.shape[0], heads, source + lengths["encoder"], config.d_model // heads)]
    self_rows = 0 if decoding_path == "split" else lengths["decoder"]
    want = [(b, h, n + (lengths["cross"] if n == source else self_rows), d) for b, h, n, d in stock]
    assert prefixed == sorted(want + encoder_joins * 2 * config.encoder_layers)
