"""Validates ``reference.py`` on BART's relatives against the stock models.

For every model type of ``models.MODELS`` and every attention implementation
its head has on the installed release (``models.implementations``):

* without a prefix the stock model is the truth: teacher-forced logits on a
  padded source (float64 reference vs float32 model), the encoder output, the
  decoder hidden state of the bare base model, greedy ``generate`` (with rows
  finishing at different steps) and the sequence log-probabilities;
* with a prefix, an exact identity: a prefix equal to the layer's own keys and
  values duplicates every key, which leaves softmax attention unchanged.  With
  an unpadded source and a one-token decoder input this holds at the encoder,
  decoder and cross sites together, so the reference with that prefix must
  equal the stock model without one.

The suite's conftest patches transformers' classes around every test, so the
"stock" side is a private, never-patched copy of each ``modeling_*`` module
(``test_stock_side_is_unpatched`` checks this).

This file must not import ``bart_prefix_patch``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))

import models as M  # noqa: E402
import reference as R  # noqa: E402

ATOL = 1e-4
CASES = [(mt, impl) for mt in M.MODELS for impl in M.implementations(mt)]
CASE_IDS = [f"{mt}-{impl}" for mt, impl in CASES]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _pristine_module(model_type: str) -> types.ModuleType:
    """A fresh, never-patched copy of the relative's ``modeling_*`` module."""
    head = getattr(transformers, M.MODELS[model_type].head)
    original = sys.modules[head.__module__]
    package, _, leaf = original.__name__.rpartition(".")
    name = f"{package}._family_reference_pristine_{leaf}"
    spec = importlib.util.spec_from_file_location(name, original.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # for relative imports and deepcopy/pickling
    spec.loader.exec_module(module)
    return module


def unpatched(model):
    """The same weights and generation settings in the pristine head class."""
    cls = getattr(_pristine_module(model.config.model_type), type(model).__name__)
    copy_ = cls._from_config(copy.deepcopy(model.config), attn_implementation=model.config._attn_implementation)
    copy_.load_state_dict(model.state_dict())
    copy_.generation_config = copy.deepcopy(model.generation_config)
    return copy_.eval()


@functools.lru_cache(maxsize=None)
def _cached(model_type: str, impl: str, seed: int):
    return unpatched(M.tiny_family_model(model_type, seed=seed, attn_implementation=impl))


def stock(model_type: str, impl: str, seed: int = 0):
    """A fresh deep copy (tests may edit it) of the unpatched tiny model."""
    return copy.deepcopy(_cached(model_type, impl, seed))


def _source(config, batch: int = 4, length: int = 7, seed: int = 1):
    """Source ids/mask: no padding, right padding (2 and 4 pads), left padding (2 pads).

    Pad positions hold ``pad_token_id``: M2M100 numbers its positions from the
    pad tokens of the ids, not from the attention mask.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 2 :] = 0
    mask[2, length - 4 :] = 0
    if batch > 3:
        mask[3, :2] = 0
    ids[mask == 0] = config.pad_token_id
    return ids, mask


def _target(config, batch: int = 4, length: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, M.decoder_vocab_size(config), (batch, length), generator=g)
    ids[:, 0] = config.decoder_start_token_id
    return ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = _max_diff(actual, expected)
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# --------------------------------------------------------------------------
# The table itself
# --------------------------------------------------------------------------


def test_stock_side_is_unpatched():
    for model_type in M.MODELS:
        if not M.available(model_type):
            continue
        pristine = _pristine_module(model_type)
        head = getattr(pristine, M.MODELS[model_type].head)
        assert head is not getattr(transformers, M.MODELS[model_type].head)
        for cls in vars(pristine).values():
            if isinstance(cls, type) and cls.__module__ == pristine.__name__ and "forward" in cls.__dict__:
                assert type(cls.__dict__["forward"]) is types.FunctionType, cls
        assert type(head.generate) is types.FunctionType


def test_table_covers_every_relative_with_tiny_dims():
    assert set(M.MODELS) == {
        "bart", "mbart", "marian", "pegasus", "plbart", "blenderbot", "blenderbot-small", "m2m_100"
    }  # fmt: skip
    assert set(M.MODELS) == set(R.MODEL_SPECS)
    assert M.MODELS["m2m_100"].causal_lm is None
    for model_type in M.MODELS:
        if not M.available(model_type):
            continue
        cfg = M.family_config(model_type)
        assert cfg.model_type == model_type
        assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (32, 2, 3)
        assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (4, 2)
        assert cfg.init_std == 0.2 and cfg.dropout == 0.0
        assert getattr(cfg, "forced_bos_token_id", None) is None
        assert getattr(cfg, "forced_eos_token_id", None) is None
        impls = M.implementations(model_type)
        cls = getattr(transformers, M.MODELS[model_type].head)
        assert impls[0] == "eager" and ("sdpa" in impls) == bool(getattr(cls, "_supports_sdpa", False))
        causal = M.MODELS[model_type].causal_lm
        assert causal is None or hasattr(transformers, causal)
    assert M.decoder_vocab_size(M.family_config("marian")) == 48


def test_bart_entry_is_reference_tiny_model():
    a, b = M.tiny_family_model("bart", seed=4), R.tiny_model(seed=4)
    assert a.config.to_dict() == b.config.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_model_type_and_implementation_skip():
    with pytest.raises(pytest.skip.Exception):
        M.tiny_family_model("m2m_100", attn_implementation="no-such-attention")


def test_spec_is_cross_checked_against_state_dict(monkeypatch):
    m = stock("mbart", "eager")
    ids, mask = _source(m.config)
    monkeypatch.setitem(R.MODEL_SPECS, "mbart", dataclasses.replace(R.MODEL_SPECS["mbart"], final_layer_norm=False))
    with pytest.raises(TypeError, match="layer_norm"):
        R.reference_encoder(m, ids, mask)
    cfg = copy.deepcopy(m.config)
    cfg.model_type = "t5"
    with pytest.raises(TypeError, match="unsupported"):
        R.model_spec(cfg)


@pytest.mark.parametrize("model_type", ["marian", "pegasus"])
def test_sinusoid_formula_matches_stock_table(model_type):
    m = stock(model_type, "eager")
    for stack in (m.model.encoder, m.model.decoder):
        table = stack.embed_positions.weight
        _assert_close(R.marian_sinusoids(*table.shape), table, 1e-6)


def test_m2m100_positions_match_stock_rule():
    m = stock("m2m_100", "eager")
    pad = m.config.pad_token_id
    emb = m.model.encoder.embed_positions
    _assert_close(R.m2m100_sinusoids(emb.weights.shape[0], 32, pad), emb.weights, 1e-5)
    ids = torch.tensor([[5, 6, 7, pad, pad], [pad, pad, 5, 6, 7], [5, pad, 6, pad, 7]])
    positions = R.m2m100_position_ids(ids, pad)
    assert positions.tolist() == [[2, 3, 4, 1, 1], [1, 1, 2, 3, 4], [2, 1, 3, 1, 4]]
    with torch.no_grad():
        expected = emb(ids)  # the stock module, from the ids alone
    table = R.m2m100_sinusoids(int(positions.max()) + 1, 32, pad)
    _assert_close(torch.nn.functional.embedding(positions, table), expected, 1e-5)


def test_random_prefix_fits_every_relative():
    for model_type in M.MODELS:
        if not M.available(model_type):
            continue
        cfg = M.family_config(model_type)
        p = R.random_prefix(cfg, batch=2, enc_len=3, dec_len=4, cross_len=5)
        assert len(p.encoder) == cfg.encoder_layers and len(p.decoder) == len(p.cross) == cfg.decoder_layers
        assert p.encoder[0][0].shape == (2, 4, 3, 8)
        assert p.decoder[0][1].shape == (2, 2, 4, 16) and p.cross[2][0].shape == (2, 2, 5, 16)


# --------------------------------------------------------------------------
# No prefix: the stock model is the truth
# --------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,impl", CASES, ids=CASE_IDS)
def test_logits_and_encoder_match_stock(model_type, impl):
    m = stock(model_type, impl)
    cfg = m.config
    ids, mask = _source(cfg)
    dec = _target(cfg)
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False)
        enc = m.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = m.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False)
    ref = R.reference_logits(m, ids, dec, mask)
    assert ref.dtype == torch.float64 and ref.shape == (4, 6, M.decoder_vocab_size(cfg))
    _assert_close(ref, out.logits)
    _assert_close(R.reference_encoder(m, ids, mask), enc)
    # The bare base model: decoder last hidden state.
    _assert_close(R.reference_logits(m.model, ids, dec, mask), hidden.last_hidden_state)
    # A decoder padding mask (keys only; every query keeps a visible key).
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 4:] = 0
    dec_mask[1, 2] = 0
    with torch.no_grad():
        masked = m(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, use_cache=False
        ).logits
    real = dec_mask.bool()
    ref_masked = R.reference_logits(m, ids, dec, mask, decoder_attention_mask=dec_mask)
    _assert_close(ref_masked[real], masked[real])
    assert _max_diff(masked[1, 3:], out.logits[1, 3:]) > 1e-2  # the mask is not vacuous


def _finishing_token(seqs: torch.Tensor, start: int, pad: int) -> int | None:
    """A generated token that some rows emit (before the last step) and others never do."""
    body = seqs[:, 1:-1]
    for tok in body[0].tolist() + body[1].tolist():
        rows = (body == tok).any(dim=1)
        if 0 < int(rows.sum()) < seqs.shape[0] and tok not in (start, pad):
            return tok
    return None


@pytest.mark.parametrize("model_type,impl", CASES, ids=CASE_IDS)
def test_greedy_and_logprob_match_stock_generate(model_type, impl):
    m = stock(model_type, impl)
    cfg = m.config
    n = 8

    def generate(ids, mask):
        with torch.no_grad():
            return m.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=n,
                output_logits=True,
                return_dict_in_generate=True,
            )

    # Tiny random models often repeat one token, and some (mBART at seed 0)
    # barely depend on the source: walk through sources until the rows'
    # greedy outputs differ.  Every source tried is compared too.
    for seed in range(1, 9):
        ids, mask = _source(cfg, seed=seed)
        out = generate(ids, mask)
        ref = R.reference_greedy(m, ids, n, mask)
        assert ref.dtype == torch.long
        assert torch.equal(ref, out.sequences), f"\nref={ref}\nstock={out.sequences}"
        assert (ref[:, 0] == cfg.decoder_start_token_id).all()
        # A token that some rows generate and others do not.
        eos = _finishing_token(ref, cfg.decoder_start_token_id, cfg.pad_token_id)
        if eos is not None:
            break
    assert eos is not None, ref

    # Declare it EOS (the logits are unchanged): rows finish at different
    # steps and are padded, as generate() does.
    m.config.eos_token_id = eos
    m.generation_config.eos_token_id = eos
    out = generate(ids, mask)
    ref = R.reference_greedy(m, ids, n, mask)
    assert torch.equal(ref, out.sequences), f"\nref={ref}\nstock={out.sequences}"
    finished = (ref[:, 1:] == eos).any(dim=1)
    assert finished.any() and not finished.all()
    assert (ref[:, 1:] == cfg.pad_token_id).any(), "some row must have finished and been padded"

    # Sequence log-probabilities: generate's step logits are the truth.
    got = R.reference_sequence_logprob(m, ids, out.sequences, mask)
    step_lp = torch.stack([torch.log_softmax(x.double(), -1) for x in out.logits], dim=1)
    targets = out.sequences[:, 1:]
    picked = step_lp.gather(-1, targets[..., None]).squeeze(-1)
    alive = torch.ones_like(targets, dtype=torch.bool)
    alive[:, 1:] = (targets[:, :-1] != eos).cumprod(dim=1).bool()
    _assert_close(got, (picked * alive).sum(1))


def test_marian_shared_embeddings_match_stock():
    m = unpatched(M.tiny_family_model("marian", share_encoder_decoder_embeddings=True, tie_word_embeddings=True))
    assert M.decoder_vocab_size(m.config) == 64
    ids, mask = _source(m.config)
    dec = _target(m.config)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
    _assert_close(R.reference_logits(m, ids, dec, mask), logits)


@pytest.mark.parametrize("model_type", list(M.MODELS))
def test_scale_embedding_switch(model_type):
    # Each table entry fixes scale_embedding one way; the other way must match too.
    base = M.family_config(model_type)
    m = unpatched(M.tiny_family_model(model_type, seed=2, scale_embedding=not base.scale_embedding))
    ids, mask = _source(m.config, seed=3)
    dec = _target(m.config, seed=4)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
    _assert_close(R.reference_logits(m, ids, dec, mask), logits)


# --------------------------------------------------------------------------
# Prefix: duplicating every key/value is an identity
# --------------------------------------------------------------------------


def _own_keys_values(m, ids, dec):
    """Stock forward (no prefix) that captures every attention's projected keys/values."""
    captured, hooks = {}, []
    sites = {
        "encoder": [layer.self_attn for layer in m.model.encoder.layers],
        "decoder": [layer.self_attn for layer in m.model.decoder.layers],
        "cross": [layer.encoder_attn for layer in m.model.decoder.layers],
    }
    for site, attns in sites.items():
        for i, attn in enumerate(attns):
            for proj in ("k_proj", "v_proj"):
                hooks.append(
                    getattr(attn, proj).register_forward_hook(
                        lambda mod, args, out, key=(site, i, proj): captured.__setitem__(key, out.detach())
                    )
                )
    try:
        with torch.no_grad():
            logits = m(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    cfg = m.config
    heads = {"encoder": cfg.encoder_attention_heads, "decoder": cfg.decoder_attention_heads}
    heads["cross"] = heads["decoder"]

    def split(x, h):
        b, t, d = x.shape
        return x.view(b, t, h, d // h).transpose(1, 2)

    prefix = SimpleNamespace(
        **{
            site: tuple(
                (split(captured[site, i, "k_proj"], heads[site]), split(captured[site, i, "v_proj"], heads[site]))
                for i in range(len(attns))
            )
            for site, attns in sites.items()
        }
    )
    return logits, prefix


@pytest.mark.parametrize("model_type,impl", CASES, ids=CASE_IDS)
def test_prefix_duplicating_keys_is_identity(model_type, impl):
    m = stock(model_type, impl)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, m.config.vocab_size, (2, 6), generator=g)
    # One decoder token: its own key/value is all a causal query may see twice.
    dec = torch.full((2, 1), m.config.decoder_start_token_id)
    logits, prefix = _own_keys_values(m, ids, dec)
    _assert_close(R.reference_logits(m, ids, dec, prefix=prefix), logits)
    # Each site is really used: bending its copy breaks the identity.
    for site in ("encoder", "decoder", "cross"):
        bent = SimpleNamespace(**vars(prefix))
        setattr(bent, site, tuple((k, v * 1.5) for k, v in getattr(prefix, site)))
        assert _max_diff(R.reference_logits(m, ids, dec, prefix=bent), logits) > 1e-3, site
