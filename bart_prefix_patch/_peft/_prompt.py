"""Converting PEFT's prefix-tuning prompt into a :class:`~bart_prefix_patch.Prefix`."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import PrefixError
from ..prefix import Prefix
from ._common import FULL, SEMANTICS, prefix_tuning as _prefix_tuning, semantics_of as _semantics_of, seq2seq_core as _bart_core


def peft_prefix(peft_model: Any, semantics: Optional[str] = None) -> Prefix:
    """The :class:`Prefix` the integration hands the base model for a PEFT prefix-tuning adapter.

    PEFT's prompt encoder produces ``num_layers * 2`` key/value rows per virtual
    token (its ``num_layers``, heads and width come from the config's *encoder*
    entries). PEFT's own ``get_prompt`` duplicates them along the layer axis
    (``num_transformer_submodules=2``) and cuts the result into one
    ``(self_k, self_v, cross_k, cross_v)`` entry per layer; this function does
    the same, then maps entry ``i mod num_layers`` to decoder layer ``i`` (the
    entry stock PEFT feeds decoder layer ``i`` whenever it has one; with fewer
    entries than decoder layers they repeat) and reshapes each key/value from
    PEFT's head count to the decoder's (the same ``d_model`` features, split
    into the decoder's heads). ``"legacy"`` leaves out the cross half, as stock
    PEFT does.

    Args:
        peft_model: A ``PeftModelForSeq2SeqLM`` with an active PREFIX_TUNING adapter on a BART model.
        semantics: ``"full"`` or ``"legacy"``; default: the adapter's own (:func:`peft_semantics`).

    Returns:
        A batch-1 prefix (it broadcasts), with gradients when the prompt encoder
        is trainable and autograd is on.
    """
    return adapter_prefix(peft_model, peft_model.active_adapter, semantics)


def adapter_prefix(peft_model: Any, adapter: str, semantics: Optional[str] = None) -> Prefix:
    """:func:`peft_prefix` of the adapter named ``adapter`` (active or not), for mixed batches."""
    config = peft_model.peft_config[adapter]
    if not _prefix_tuning(config):
        raise PrefixError(f"peft_prefix: the adapter {adapter!r} is {config.peft_type}, not PREFIX_TUNING")
    core = _bart_core(peft_model)
    if core is None:
        raise PrefixError(f"peft_prefix: expected a BART base model, got {type(peft_model.get_base_model()).__name__}")
    semantics = semantics or _semantics_of(config)
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    encoder = peft_model.prompt_encoder[adapter]
    length, layers = config.num_virtual_tokens, config.num_layers
    heads, width = config.num_attention_heads, config.token_dim
    d_model = core.config.d_model
    decoder_heads = core.config.decoder_attention_heads
    if width != d_model or width % heads:
        raise PrefixError(
            f"PrefixTuningConfig(token_dim={width}, num_attention_heads={heads}) does not fit the model "
            f"(d_model={d_model}): token_dim must equal d_model and be divisible by num_attention_heads"
        )
    submodules = config.num_transformer_submodules or 2
    # As PEFT's get_prompt (peft_model.py), for one row: the rows of a batch are identical.
    if config.inference_mode:
        raw = encoder.embedding.weight.unsqueeze(0)
    else:
        tokens = peft_model.prompt_tokens[adapter][:length].unsqueeze(0).to(encoder.embedding.weight.device)
        raw = encoder(tokens)
    dtype = peft_model.base_model_torch_dtype
    if dtype is not None:
        raw = raw.to(dtype)
    raw = raw.view(1, length, layers * 2, heads, width // heads)
    if submodules == 2:
        raw = torch.cat([raw, raw], dim=2)
    entries = raw.permute([2, 0, 3, 1, 4]).split(submodules * 2)

    def to_decoder_heads(tensor: torch.Tensor) -> torch.Tensor:
        if heads == decoder_heads:
            return tensor
        flat = tensor.transpose(1, 2).reshape(1, length, d_model)
        return flat.view(1, length, decoder_heads, d_model // decoder_heads).transpose(1, 2)

    decoder, cross = [], []
    for index in range(len(core.decoder.layers)):
        entry = entries[index % len(entries)]
        decoder.append((to_decoder_heads(entry[0]), to_decoder_heads(entry[1])))
        if submodules == 2 and semantics == FULL:
            cross.append((to_decoder_heads(entry[2]), to_decoder_heads(entry[3])))
    return Prefix(decoder=decoder, cross=cross or None)
