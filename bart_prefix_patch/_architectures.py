"""The table of supported architectures: knowledge about models as data.

One :class:`Architecture` row per ``config.model_type``. Everything the
package needs to know about a model family (the modeling module to patch,
its attention classes, the heads that get entry guards, the fingerprint keys
of the version gate) is derived from a row's few fields. The class-name
prefix alone does not name everything (``MarianMTModel``,
``BlenderbotSmall...`` in ``blenderbot_small``), so the heads are found at
runtime as the module's subclasses of its ``PreTrainedModel``, and the
fields that differ from the derived default are spelled out.

Pure data and the Python standard library only: ``tools/gen_fingerprints.py``
loads this file by path, without importing the package (which would patch
transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Attention class name suffixes: eager (every release); sdpa and flash
#: (their own classes on transformers 4.44 - 4.52 only).
ATTENTION_SUFFIXES = ("Attention", "SdpaAttention", "FlashAttention2")


@dataclass(frozen=True)
class Architecture:
    """One supported model family.

    Attributes:
        model_type: ``config.model_type``.
        module: The modeling module, e.g. ``transformers.models.bart.modeling_bart``.
        prefix: The class-name prefix, e.g. ``Bart``.
        seq2seq_head: The encoder-decoder LM head class (default ``{prefix}ForConditionalGeneration``).
        positions: The decoder's positional embedding class (default ``{prefix}LearnedPositionalEmbedding``).
    """

    model_type: str
    module: str
    prefix: str
    seq2seq_head: Optional[str] = None
    positions: Optional[str] = None

    @property
    def pretrained_class(self) -> str:
        """The module's ``PreTrainedModel`` base class: every guarded head derives from it."""
        return f"{self.prefix}PreTrainedModel"

    @property
    def head_class(self) -> str:
        """The sequence-to-sequence LM head (what ``load_prefix_tuned`` and the CLI build)."""
        return self.seq2seq_head or f"{self.prefix}ForConditionalGeneration"

    @property
    def positions_class(self) -> str:
        """The positional embedding class whose ``forward`` the forks rely on."""
        return self.positions or f"{self.prefix}LearnedPositionalEmbedding"

    @property
    def attention_classes(self) -> tuple[str, ...]:
        """Every attention class name the module may define (those present are patched)."""
        return tuple(self.prefix + suffix for suffix in ATTENTION_SUFFIXES)

    def fingerprinted(self) -> tuple[str, ...]:
        """Qualified names in :attr:`module` whose code the forks replace or rely on."""
        p = self.prefix
        return (
            *(f"{name}.forward" for name in self.attention_classes),
            f"{p}EncoderLayer.forward",
            f"{p}DecoderLayer.forward",
            f"{p}Encoder.forward",
            f"{p}Decoder.forward",
            f"{p}Model.forward",
            f"{self.head_class}.forward",
            f"{self.positions_class}.forward",
        )


#: ``config.model_type`` -> row. Adding a relative is one row here plus its tests (docs/supported-models.md).
ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in (
        Architecture("bart", "transformers.models.bart.modeling_bart", "Bart"),
        Architecture("mbart", "transformers.models.mbart.modeling_mbart", "MBart"),
        Architecture("marian", "transformers.models.marian.modeling_marian", "Marian",
                     seq2seq_head="MarianMTModel", positions="MarianSinusoidalPositionalEmbedding"),
        Architecture("pegasus", "transformers.models.pegasus.modeling_pegasus", "Pegasus",
                     positions="PegasusSinusoidalPositionalEmbedding"),
        Architecture("plbart", "transformers.models.plbart.modeling_plbart", "PLBart"),
        Architecture("blenderbot", "transformers.models.blenderbot.modeling_blenderbot", "Blenderbot"),
        Architecture("blenderbot-small", "transformers.models.blenderbot_small.modeling_blenderbot_small",
                     "BlenderbotSmall"),
        Architecture("m2m_100", "transformers.models.m2m_100.modeling_m2m_100", "M2M100",
                     positions="M2M100SinusoidalPositionalEmbedding"),
    )
}

#: Upstream code outside the modeling modules that every fork relies on:
#: cache update/reorder, beam expansion, generate's kwargs handling, masks, sdpa.
SHARED_FINGERPRINTED: dict[str, tuple[str, ...]] = {
    "transformers.cache_utils": (
        "EncoderDecoderCache.reorder_cache",
        "EncoderDecoderCache.get_seq_length",
        "DynamicLayer.update",
    ),
    "transformers.generation.utils": (
        "GenerationMixin._expand_inputs_for_generation",
        "GenerationMixin._prepare_encoder_decoder_kwargs_for_generation",
        "GenerationMixin._prepare_text_encoder_decoder_kwargs_for_generation",
        "GenerationMixin._validate_model_kwargs",
    ),
    "transformers.masking_utils": (
        "create_causal_mask",
        "create_bidirectional_mask",
    ),
    "transformers.modeling_attn_mask_utils": (
        "_prepare_4d_causal_attention_mask",
        "_prepare_4d_causal_attention_mask_for_sdpa",
        "_prepare_4d_attention_mask",
        "_prepare_4d_attention_mask_for_sdpa",
    ),
    "transformers.integrations.sdpa_attention": ("sdpa_attention_forward",),
}


def fingerprinted(architectures=None) -> dict[str, tuple[str, ...]]:
    """What the version gate fingerprints: module -> qualified names, for the given rows (default: all)."""
    rows = ARCHITECTURES.values() if architectures is None else architectures
    return {**{row.module: row.fingerprinted() for row in rows}, **SHARED_FINGERPRINTED}
