"""Validates the plain-PyTorch oracle in ``reference.py``.

Without a prefix the stock transformers model is an independent truth, so the
reference must reproduce it.  With a prefix, the truths used are:

* the stock decoder fed a pre-filled ``EncoderDecoderCache`` (decoder self
  prefix in the self-attention cache, cross prefix prepended to the
  cross-attention cache), with the decoder position table shifted so that the
  cache length does not move the token positions;
* the stock decoder fed the reference's prefixed encoder output;
* an exact identity for the encoder: a prefix equal to the layer's own keys
  and values duplicates every token, which leaves softmax attention unchanged.

The suite's conftest applies ``bart_prefix_patch`` to transformers' BART
classes around every test, so the "stock" side here is a private copy of
``modeling_bart`` loaded under another module name: its classes carry none of
the patch's wrappers (``test_stock_side_is_unpatched`` checks this).

This file must not import ``bart_prefix_patch``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import transformers
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache
from transformers.models.bart import modeling_bart

try:
    import transformers.masking_utils as masking_utils
except ImportError:  # transformers < 4.53 builds masks in modeling_attn_mask_utils
    masking_utils = None
try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # transformers < 4.48: no attention registry
    ALL_ATTENTION_FUNCTIONS = None

sys.path.insert(0, os.path.dirname(__file__))

import reference as R  # noqa: E402

ATOL = 1e-5
IMPLS = ("eager", "sdpa")
_PRISTINE_NAME = "transformers.models.bart._reference_test_pristine_modeling_bart"


@functools.lru_cache(maxsize=None)
def _pristine_bart() -> types.ModuleType:
    """A fresh, never-patched copy of transformers' ``modeling_bart``."""
    spec = importlib.util.spec_from_file_location(_PRISTINE_NAME, modeling_bart.__file__)
    module = importlib.util.module_from_spec(spec)
    # Registered so relative imports and deepcopy/pickling find the module.
    sys.modules[_PRISTINE_NAME] = module
    spec.loader.exec_module(module)
    return module


def unpatched(model):
    """The same weights in an unpatched ``BartForConditionalGeneration``."""
    cls = _pristine_bart().BartForConditionalGeneration
    copy_ = cls._from_config(copy.deepcopy(model.config), attn_implementation=model.config._attn_implementation)
    copy_.load_state_dict(model.state_dict())
    copy_.generation_config = copy.deepcopy(model.generation_config)
    return copy_.eval()


def tiny(**kwargs):
    """``R.tiny_model`` moved onto the unpatched classes."""
    return unpatched(R.tiny_model(**kwargs))


def _inputs(seed: int = 1):
    """A padded encoder batch (none, right, left padding) and decoder ids."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 64, (3, 7), generator=g)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, :2] = 0
    input_ids[attention_mask == 0] = 1
    decoder_input_ids = torch.randint(3, 64, (3, 6), generator=g)
    decoder_input_ids[:, 0] = 2
    return input_ids, attention_mask, decoder_input_ids


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL):
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Intra-op threads on these tiny tensors only add contention; on a busy
    # 2-core box they made the file ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=IMPLS)
def model(request):
    return tiny(seed=0, attn_implementation=request.param)


def test_stock_side_is_unpatched():
    pristine = _pristine_bart()
    assert pristine is not modeling_bart
    # A wrapper (wrapt or functools) would not be a plain function.
    classes = [pristine.BartAttention, pristine.BartEncoder, pristine.BartDecoder, pristine.BartModel]
    # transformers < 4.52 has one attention class per implementation.
    classes += [getattr(pristine, n) for n in ("BartSdpaAttention", "BartFlashAttention2") if hasattr(pristine, n)]
    for cls in classes:
        assert type(cls.__dict__["forward"]) is types.FunctionType, cls
    for name in ("forward", "generate"):
        attr = getattr(pristine.BartForConditionalGeneration, name)
        assert type(attr) is types.FunctionType, name
    # The shared helpers this release has (masking_utils and the attention registry are newer than 4.44).
    names = ("create_causal_mask", "create_bidirectional_mask", "eager_attention_forward")
    shared = [getattr(pristine, name) for name in names if hasattr(pristine, name)]
    if masking_utils is not None:  # 4.53 - 4.57 have create_causal_mask but no create_bidirectional_mask
        shared += [getattr(masking_utils, name) for name in names[:2] if hasattr(masking_utils, name)]
    if ALL_ATTENTION_FUNCTIONS is not None and "sdpa" in ALL_ATTENTION_FUNCTIONS:
        shared += [ALL_ATTENTION_FUNCTIONS["sdpa"]]
    for fn in shared:
        assert type(fn) is types.FunctionType, fn


# --------------------------------------------------------------------------
# No prefix: the stock model is the truth
# --------------------------------------------------------------------------


def test_encoder_matches_stock(model):
    input_ids, attention_mask, _ = _inputs()
    with torch.no_grad():
        stock = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    ref = R.reference_encoder(model, input_ids, attention_mask)
    assert ref.dtype == torch.float64 and ref.shape == (3, 7, 32)
    _assert_close(ref, stock)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_stock(tied):
    for impl in IMPLS:
        m = tiny(seed=3, attn_implementation=impl, tie_word_embeddings=tied)
        input_ids, attention_mask, decoder_input_ids = _inputs()
        with torch.no_grad():
            stock = m(
                input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
            ).logits
        ref = R.reference_logits(m, input_ids, decoder_input_ids, attention_mask)
        assert ref.shape == (3, 6, 64)
        _assert_close(ref, stock)
        # float32 mode is still close, and honours the dtype argument.
        ref32 = R.reference_logits(m, input_ids, decoder_input_ids, attention_mask, dtype=torch.float32)
        assert ref32.dtype == torch.float32
        _assert_close(ref32, stock)


def test_logits_with_decoder_attention_mask_match_stock(model):
    input_ids, attention_mask, decoder_input_ids = _inputs()
    decoder_attention_mask = torch.ones(3, 6, dtype=torch.long)
    decoder_attention_mask[0, 4:] = 0  # right padding
    decoder_attention_mask[1, 2] = 0  # a hole
    decoder_attention_mask[2, :2] = 0  # left padding: rows 0-1 see no key at all
    with torch.no_grad():
        stock = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        ).logits
        unmasked = model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
        ).logits
    ref = R.reference_logits(
        model, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask=decoder_attention_mask
    )
    # Fully masked query rows are implementation-defined (eager averages all
    # keys, sdpa does not), so only real decoder positions are compared.
    real = decoder_attention_mask.bool()
    _assert_close(ref[real], stock[real])
    # The mask must actually matter for the hole's row after the hole.
    assert _max_diff(stock[1, 3:], unmasked[1, 3:]) > 1e-2


def test_bart_model_returns_decoder_hidden_state(model):
    input_ids, attention_mask, decoder_input_ids = _inputs()
    base = model.model  # a BartModel: no LM head
    with torch.no_grad():
        stock = base(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
        ).last_hidden_state
    ref = R.reference_logits(base, input_ids, decoder_input_ids, attention_mask)
    assert ref.shape == (3, 6, 32)
    _assert_close(ref, stock)
    _assert_close(
        R.reference_encoder(base, input_ids, attention_mask), R.reference_encoder(model, input_ids, attention_mask), 0
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_matches_generate(impl):
    m = tiny(seed=0, attn_implementation=impl, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (4, 7), generator=g)
    attention_mask = torch.ones(4, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, :2] = 0
    n = 10
    saw_mixed = saw_all_finished = False
    # Raising the EOS logit bias step by step walks through "nobody stops",
    # "some rows stop and get padded", and "everyone stops early".
    for _ in range(6):
        with torch.no_grad():
            stock = m.generate(
                input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1, max_new_tokens=n
            )
        ref = R.reference_greedy(m, input_ids, n, attention_mask)
        assert ref.dtype == torch.long
        assert torch.equal(ref, stock), f"\nref={ref}\nstock={stock}"
        finished = (ref[:, 1:] == 2).any(dim=1)
        if ref.shape[1] == n + 1 and finished.any() and not finished.all():
            saw_mixed = True
            assert (ref == 1).any()  # finished rows are padded
        if ref.shape[1] < n + 1:
            saw_all_finished = True
        with torch.no_grad():
            m.final_logits_bias[0, 2] += 1.0
    assert saw_mixed and saw_all_finished


def test_greedy_honours_forced_tokens():
    m = tiny(seed=0, forced_eos_token_id=2)
    m.generation_config.forced_bos_token_id = 5
    m.generation_config.forced_eos_token_id = 2  # 5.0 - 5.3: BartConfig drops forced_eos_token_id
    input_ids, attention_mask, _ = _inputs()
    with torch.no_grad():
        stock = m.generate(input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1, max_new_tokens=5)
    ref = R.reference_greedy(m, input_ids, 5, attention_mask)
    assert torch.equal(ref, stock)
    assert (ref[:, 1] == 5).all() and (ref[:, -1] == 2).all()


def _stock_logprob(model, input_ids, attention_mask, sequences):
    """Sum of stock log-probs of generated tokens up to and including the first EOS."""
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=sequences[:, :-1]
        ).logits
    lp = torch.log_softmax(logits.double(), dim=-1)
    totals = []
    for row in range(sequences.shape[0]):
        total = 0.0
        for t, tok in enumerate(sequences[row, 1:].tolist()):
            total += lp[row, t, tok].item()
            if tok == 2:
                break
        totals.append(total)
    return torch.tensor(totals, dtype=torch.float64)


def test_sequence_logprob_matches_stock():
    m = tiny(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        m.final_logits_bias[0, 2] += 2.0  # rows 1 and 3 finish early: see the greedy test
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (4, 7), generator=g)
    attention_mask = torch.ones(4, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, :2] = 0
    # How high the EOS bias must be before some rows finish depends on the
    # release's weight initialisation (4.x draws other weights): raise it
    # step by step until generate() pads, as the greedy test does.
    for _ in range(16):
        with torch.no_grad():
            out = m.generate(
                input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=8,
                output_logits=True,
                return_dict_in_generate=True,
            )
        if (out.sequences == 1).any():
            break
        with torch.no_grad():
            m.final_logits_bias[0, 2] += 0.5
    sequences = out.sequences
    assert (sequences == 1).any(), "the test needs padded (finished) rows"
    ref = R.reference_sequence_logprob(m, input_ids, sequences, attention_mask)
    assert ref.shape == (4,)
    _assert_close(ref, _stock_logprob(m, input_ids, attention_mask, sequences))
    # The cached step-by-step logits of generate() are a second truth.
    step_lp = torch.stack([torch.log_softmax(x.double(), -1) for x in out.logits], dim=1)
    targets = sequences[:, 1:]
    picked = step_lp.gather(-1, targets[..., None]).squeeze(-1)
    alive = torch.ones_like(targets, dtype=torch.bool)
    alive[:, 1:] = (targets[:, :-1] != 2).cumprod(dim=1).bool()
    _assert_close(ref, (picked * alive).sum(1))


# --------------------------------------------------------------------------
# Prefix
# --------------------------------------------------------------------------


def _stock_with_prefix(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, prefix):
    """Stock-model logits for ``prefix`` via a pre-filled cache.

    The encoder prefix enters through the reference's encoder output (checked
    separately by the duplication identity); decoder and cross prefixes enter
    through the stock cache machinery.
    """
    cfg = model.config
    bsz = input_ids.shape[0]
    heads = cfg.decoder_attention_heads
    enc = R.reference_encoder(model, input_ids, attention_mask, prefix=prefix).float()

    stock = model
    self_cache, cross_cache = DynamicCache(), DynamicCache()
    dec_len = 0
    enc_mask = attention_mask
    if prefix.decoder is not None:
        dec_len = prefix.decoder[0][0].shape[2]
        # The stock decoder places tokens at cache_length + t; shift the
        # position table so that they land on the rows of positions t.
        stock = copy.deepcopy(model)
        with torch.no_grad():
            table = stock.model.decoder.embed_positions.weight
            table[2 + dec_len :] = table[2 : table.shape[0] - dec_len].clone()
        for i, (k, v) in enumerate(prefix.decoder):
            self_cache.update(k.expand(bsz, -1, -1, -1).contiguous(), v.expand(bsz, -1, -1, -1).contiguous(), i)
    if prefix.cross is not None:
        cross_len = prefix.cross[0][0].shape[2]
        head_dim = cfg.d_model // heads
        for i, (k, v) in enumerate(prefix.cross):
            # The cache holds projected encoder states; a pre-filled layer is
            # reused as-is (EncoderDecoderCache.is_updated), prefix included.
            attn = model.model.decoder.layers[i].encoder_attn
            ek = F.linear(enc, attn.k_proj.weight, attn.k_proj.bias).view(bsz, -1, heads, head_dim).transpose(1, 2)
            ev = F.linear(enc, attn.v_proj.weight, attn.v_proj.bias).view(bsz, -1, heads, head_dim).transpose(1, 2)
            cross_k = torch.cat([k.expand(bsz, -1, -1, -1), ek], dim=2)
            cross_v = torch.cat([v.expand(bsz, -1, -1, -1), ev], dim=2)
            cross_cache.update(cross_k, cross_v, i)
        # The cross mask's length follows the 2D mask, so it must cover the prefix.
        enc_mask = torch.cat([torch.ones(bsz, cross_len, dtype=torch.long), attention_mask], dim=1)
    cache = EncoderDecoderCache(self_cache, cross_cache)
    dec_mask = None
    if decoder_attention_mask is not None:
        dec_mask = torch.cat([torch.ones(bsz, dec_len, dtype=torch.long), decoder_attention_mask], dim=1)
    with torch.no_grad():
        return stock(
            encoder_outputs=(enc,),
            attention_mask=enc_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=dec_mask,
            cache=cache,
            use_cache=True,
        ).logits


# This oracle drives transformers' own cache machinery (pre-filled DynamicCache
# layers, decoder_attention_mask of length T) exactly as 5.24 implements it;
# other releases pad or size those masks differently. The reference itself is
# version independent, so validating it on one release is enough.
_STOCK_CACHE_ORACLE = tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (5, 24)


@pytest.mark.skipif(not _STOCK_CACHE_ORACLE, reason="stock cache oracle is written for transformers >= 5.24")
@pytest.mark.parametrize(
    "sites", [("encoder",), ("decoder",), ("cross",), ("encoder", "decoder", "cross")], ids="+".join
)
@pytest.mark.parametrize("prefix_batch", [1, 3])
def test_prefix_logits_match_stock_cache(model, sites, prefix_batch):
    input_ids, attention_mask, decoder_input_ids = _inputs()
    decoder_attention_mask = torch.ones(3, 6, dtype=torch.long)
    decoder_attention_mask[0, 4:] = 0
    prefix = R.random_prefix(model.config, batch=prefix_batch, sites=sites, seed=7)
    ref = R.reference_logits(
        model, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, prefix=prefix
    )
    stock = _stock_with_prefix(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, prefix)
    _assert_close(ref, stock)
    # Not vacuous: the prefix moves the logits by far more than the tolerance.
    plain = R.reference_logits(model, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask)
    assert _max_diff(ref, plain) > 0.1


def test_encoder_prefix_duplicating_tokens_is_identity(model):
    # With prefix = (K_l, V_l) of the same input at every layer, each query sees
    # every key twice, which leaves softmax attention unchanged; so the output
    # must equal the stock, prefix-free encoder.
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 64, (2, 6), generator=g)
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.encoder.layers):
        for name in ("k_proj", "v_proj"):
            hooks.append(
                getattr(layer.self_attn, name).register_forward_hook(
                    lambda mod, args, out, key=(i, name): captured.__setitem__(key, out.detach())
                )
            )
    try:
        with torch.no_grad():
            stock = model.get_encoder()(input_ids=input_ids).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    heads = model.config.encoder_attention_heads

    def split(x):
        return x.view(2, 6, heads, 32 // heads).transpose(1, 2)

    pairs = tuple((split(captured[i, "k_proj"]), split(captured[i, "v_proj"])) for i in range(2))
    prefix = SimpleNamespace(encoder=pairs, decoder=None, cross=None)
    _assert_close(R.reference_encoder(model, input_ids, prefix=prefix), stock)
    # Perturbing the copy breaks the identity, so the prefix is really used.
    bent = SimpleNamespace(encoder=tuple((k, v * 1.5) for k, v in pairs), decoder=None, cross=None)
    assert _max_diff(R.reference_encoder(model, input_ids, prefix=bent), stock) > 1e-2


def test_empty_prefix_is_identity(model):
    input_ids, attention_mask, decoder_input_ids = _inputs()
    prefix = R.random_prefix(model.config, enc_len=0, dec_len=0, cross_len=0)
    _assert_close(
        R.reference_logits(model, input_ids, decoder_input_ids, attention_mask, prefix=prefix),
        R.reference_logits(model, input_ids, decoder_input_ids, attention_mask),
        1e-12,
    )


def test_prefix_is_padding_invariant(model):
    # Each right-padded row must equal the same row run alone without
    # padding: padding must hide pad tokens and nothing else (never the prefix).
    input_ids, attention_mask, decoder_input_ids = _inputs()
    decoder_attention_mask = torch.ones(3, 6, dtype=torch.long)
    decoder_attention_mask[1, 3:] = 0
    prefix = R.random_prefix(model.config, batch=3, seed=11)
    batched = R.reference_logits(
        model, input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, prefix=prefix
    )
    # Row 2 is left-padded: stock BART numbers positions from the first
    # column, pads included, so dropping its padding shifts its positions.
    for row in range(2):
        src = attention_mask[row].bool()
        tgt = decoder_attention_mask[row].bool()
        row_prefix = SimpleNamespace(
            **{
                site: tuple((k[row : row + 1], v[row : row + 1]) for k, v in getattr(prefix, site))
                for site in ("encoder", "decoder", "cross")
            }
        )
        alone = R.reference_logits(
            model, input_ids[row : row + 1, src], decoder_input_ids[row : row + 1, tgt], prefix=row_prefix
        )
        _assert_close(batched[row, tgt], alone[0], 1e-9)


def test_greedy_and_logprob_with_prefix_are_consistent(model):
    input_ids, attention_mask, _ = _inputs()
    prefix = R.random_prefix(model.config, seed=3)
    seqs = R.reference_greedy(model, input_ids, 6, attention_mask, prefix=prefix)
    logits = R.reference_logits(model, input_ids, seqs[:, :-1], attention_mask, prefix=prefix)
    assert torch.equal(logits.argmax(-1), seqs[:, 1:])
    assert not torch.equal(seqs, R.reference_greedy(model, input_ids, 6, attention_mask))
    expected = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).squeeze(-1).sum(1)
    got = R.reference_sequence_logprob(model, input_ids, seqs, attention_mask, prefix=prefix)
    _assert_close(got, expected, 1e-10)


def test_random_prefix_shapes_and_site_independence():
    cfg = R.tiny_config()
    full = R.random_prefix(cfg, batch=2, enc_len=3, dec_len=4, cross_len=5)
    assert len(full.encoder) == 2 and len(full.decoder) == 3 and len(full.cross) == 3
    assert full.encoder[0][0].shape == (2, 4, 3, 8)
    assert full.decoder[0][1].shape == (2, 2, 4, 16)
    assert full.cross[2][0].shape == (2, 2, 5, 16)
    assert full.encoder[0][0].dtype == torch.float32
    only = R.random_prefix(cfg, batch=2, enc_len=3, dec_len=4, cross_len=5, sites=("decoder",))
    assert only.encoder is None and only.cross is None
    assert torch.equal(only.decoder[1][0], full.decoder[1][0])
    assert not torch.equal(R.random_prefix(cfg, seed=1).cross[0][0], R.random_prefix(cfg, seed=0).cross[0][0])
    with pytest.raises(ValueError):
        R.random_prefix(cfg, sites=("encodr",))


def test_bad_prefix_shapes_raise(model):
    input_ids, attention_mask, decoder_input_ids = _inputs()
    cfg = model.config
    wrong_heads = R.random_prefix(cfg, sites=("encoder",))
    wrong_heads.encoder = tuple((k.view(1, 2, 3, 16), v.view(1, 2, 3, 16)) for k, v in wrong_heads.encoder)
    too_few = R.random_prefix(cfg, sites=("cross",))
    too_few.cross = too_few.cross[:2]
    bad_batch = R.random_prefix(cfg, batch=2, sites=("decoder",))
    for prefix in (wrong_heads, too_few, bad_batch):
        with pytest.raises(ValueError):
            R.reference_logits(model, input_ids, decoder_input_ids, attention_mask, prefix=prefix)


def test_tiny_config_fields():
    cfg = R.tiny_config(d_model=16)
    # 5.0 - 5.3: BartConfig accepts forced_eos_token_id but keeps no such attribute.
    assert cfg.d_model == 16 and cfg.scale_embedding and getattr(cfg, "forced_eos_token_id", None) is None
    m = R.tiny_model(attn_implementation="sdpa")
    assert m.config._attn_implementation == "sdpa" and not m.training
    assert m.final_logits_bias.abs().sum() > 0
