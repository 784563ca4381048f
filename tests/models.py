"""One table of tiny configs for BART and its relatives.

Every entry shares ``reference.tiny_config``'s dimensions (d_model 32, a
2-layer/4-head encoder and a 3-layer/2-head decoder, FFN 48, vocab 64, no
dropout, ``init_std`` 0.2, pad 1 / bos 0 / eos 2, no forced BOS/EOS) and adds
what makes the relative realistic (activation, embedding scaling, Marian's
separate 48-row decoder vocabulary, Marian's and Pegasus' pad-as-decoder-start).
``tiny_family_model`` randomises LayerNorms, Linear biases and
``final_logits_bias`` exactly as ``reference.tiny_model`` does, so a reference
that forgot any of them disagrees with the stock model.

API:

* ``MODELS``: model type (``config.model_type``; "blenderbot-small" has a
  dash, "m2m_100" covers NLLB dense) -> :class:`Family`;
* ``family_config(model_type, **overrides)`` -> config;
* ``tiny_family_model(model_type, seed=0, attn_implementation="eager", **overrides)``
  -> the seq2seq head in eval mode;
* ``implementations(model_type)`` -> the attention implementations the
  installed release has for that head ("eager" always, "sdpa" when
  ``_supports_sdpa``);
* ``available(model_type)`` / ``require(model_type)``: whether the installed
  release has the classes / ``pytest.skip`` if not;
* ``decoder_vocab_size(config)``: the size of the decoder's (and LM head's) vocabulary.

This file must not import ``bart_prefix_patch``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))

import reference as R  # noqa: E402

__all__ = [
    "Family",
    "MODELS",
    "available",
    "require",
    "family_config",
    "tiny_family_model",
    "implementations",
    "decoder_vocab_size",
]


@dataclass(frozen=True)
class Family:
    """One relative.

    Attributes:
        config: Name of the config class in ``transformers``.
        head: Name of the seq2seq LM head class.
        causal_lm: Name of the decoder-only head class, or None (M2M100 has none).
        overrides: Config fields on top of the shared tiny dimensions.
    """

    config: str
    head: str
    causal_lm: str | None
    overrides: dict = field(default_factory=dict)


# Shared with reference.tiny_config (which stays the BART entry's builder).
_COMMON = R.TINY_DIMS

MODELS: dict[str, Family] = {
    "bart": Family("BartConfig", "BartForConditionalGeneration", "BartForCausalLM"),
    "mbart": Family(
        "MBartConfig", "MBartForConditionalGeneration", "MBartForCausalLM", dict(scale_embedding=False)
    ),
    "marian": Family(
        "MarianConfig",
        "MarianMTModel",
        "MarianForCausalLM",
        # Real Marian checkpoints start decoding with the pad token; the
        # decoder vocabulary (LM head, final_logits_bias) differs from the
        # encoder's.  The head is untied: 4.x builds the unshared decoder
        # table with vocab_size rows, so tying it would give a 64-row head
        # against a 48-entry final_logits_bias (forward fails on 4.44/4.57).
        dict(
            activation_function="swish",
            decoder_vocab_size=48,
            share_encoder_decoder_embeddings=False,
            tie_word_embeddings=False,
            decoder_start_token_id=1,
        ),
    ),
    "pegasus": Family(
        "PegasusConfig",
        "PegasusForConditionalGeneration",
        "PegasusForCausalLM",
        dict(activation_function="relu", decoder_start_token_id=1),
    ),
    "plbart": Family("PLBartConfig", "PLBartForConditionalGeneration", "PLBartForCausalLM"),
    "blenderbot": Family(
        "BlenderbotConfig",
        "BlenderbotForConditionalGeneration",
        "BlenderbotForCausalLM",
        # BlenderbotConfig defaults encoder_no_repeat_ngram_size to 3, which
        # generate() would apply; the reference implements plain greedy only.
        dict(scale_embedding=False, encoder_no_repeat_ngram_size=0),
    ),
    "blenderbot-small": Family(
        "BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration", "BlenderbotSmallForCausalLM"
    ),
    "m2m_100": Family(
        "M2M100Config", "M2M100ForConditionalGeneration", None, dict(activation_function="relu")
    ),
}


def available(model_type: str) -> bool:
    """Whether the installed transformers has this relative's config and head."""
    fam = MODELS[model_type]
    return hasattr(transformers, fam.config) and hasattr(transformers, fam.head)


def require(model_type: str) -> Family:
    """The table entry; ``pytest.skip`` where the installed release lacks the model."""
    if not available(model_type):
        pytest.skip(f"transformers {transformers.__version__} has no {MODELS[model_type].head}")
    return MODELS[model_type]


def family_config(model_type: str, **overrides):
    """The tiny config of ``model_type`` (``reference.tiny_config`` for BART)."""
    fam = require(model_type)
    if model_type == "bart":
        return R.tiny_config(**overrides)
    kwargs = dict(_COMMON, **fam.overrides)
    kwargs.update(overrides)
    config = getattr(transformers, fam.config)(**kwargs)
    assert config.model_type == model_type, (config.model_type, model_type)
    return config


def implementations(model_type: str) -> tuple[str, ...]:
    """Attention implementations of the head on the installed release.

    "eager" always; "sdpa" where the class declares ``_supports_sdpa``
    (most relatives are eager-only on 4.44 - 4.52).  A model type missing
    from the release answers ("eager",) so that its tests still collect and
    then skip through :func:`require`.
    """
    if not available(model_type):
        return ("eager",)
    cls = getattr(transformers, MODELS[model_type].head)
    return ("eager", "sdpa") if getattr(cls, "_supports_sdpa", False) else ("eager",)


def decoder_vocab_size(config) -> int:
    """Rows of the decoder's token table and LM head (Marian may differ from ``vocab_size``)."""
    if getattr(config, "model_type", None) == "marian" and not config.share_encoder_decoder_embeddings:
        return config.decoder_vocab_size
    return config.vocab_size


def tiny_family_model(model_type: str, seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A seeded tiny seq2seq head of ``model_type`` in eval mode.

    BART is exactly ``reference.tiny_model``.  For the others, LayerNorm
    weights/biases, every Linear bias and ``final_logits_bias`` (if the head
    has one) are randomised the same way.

    Args:
        model_type: A key of :data:`MODELS`.
        seed: Seed for ``torch.manual_seed``.
        attn_implementation: One of :func:`implementations`.
        **overrides: Config fields.

    Returns:
        The model, in eval mode.
    """
    fam = require(model_type)
    if attn_implementation not in implementations(model_type):
        pytest.skip(f"{fam.head} has no {attn_implementation} attention on transformers {transformers.__version__}")
    if model_type == "bart":
        return R.tiny_model(seed=seed, attn_implementation=attn_implementation, **overrides)
    config = family_config(model_type, **overrides)
    torch.manual_seed(seed)
    cls = getattr(transformers, fam.head)
    model = cls._from_config(config, attn_implementation=attn_implementation)
    return R.randomize_(model).eval()
