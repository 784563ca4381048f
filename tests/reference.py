"""Independent plain-PyTorch reference for BART (and its relatives) with prefix-tuning.

This module is the test oracle for ``bart_prefix_patch``.  It re-derives the
whole BART forward pass (post-LayerNorm encoder/decoder, learned positions
with offset 2, optional embedding scaling, ``final_logits_bias``) from the
weights of a stock ``transformers`` model, and adds Li & Liang (2021) prefix
key/value pairs at three sites:

* encoder self-attention: keys/values are ``[prefix ; tokens]``; the prefix is
  visible to every query and the padding mask only hides padded tokens;
* decoder self-attention: ``[prefix ; tokens]``, causal over the real tokens,
  prefix visible to every query;
* cross-attention: ``[prefix ; projections of the encoder output]``; the
  encoder padding mask only applies to the encoder part.

Decoder positions are always ``0..T-1`` whatever the prefix length.

BART's relatives (mBART, Marian, Pegasus, PLBart, Blenderbot, BlenderbotSmall,
M2M100/NLLB) share the attention and prefix mechanics and differ only in the
switches of :class:`ModelSpec`, looked up by ``config.model_type`` in
:data:`MODEL_SPECS` and cross-checked against the state_dict's keys:

* ``pre_ln``: LayerNorm before each sub-layer (residual stream left
  un-normalised) instead of after the residual add;
* ``final_layer_norm``: ``encoder.layer_norm`` / ``decoder.layer_norm`` after
  the last layer;
* ``layernorm_embedding``: ``{stack}.layernorm_embedding`` after the token +
  position sum, or (``"tokens"``, BlenderbotSmall's decoder) on the scaled
  token embeddings only, before the positions are added;
* ``positions``: ``"learned"`` (table rows ``offset + t``), ``"sinusoidal"``
  (Marian/Pegasus: a fixed sin|cos table, row ``t``) or ``"m2m100"`` (fairseq
  sinusoids, row ``padding_idx + #non-pad tokens up to t`` for real tokens and
  the all-zero row ``padding_idx`` for pad tokens: positions depend on the pad
  tokens in the ids, not on the attention mask);
* embedding scaling by ``sqrt(d_model)`` follows ``config.scale_embedding``;
* the head is ``lm_head.weight`` (Marian: ``decoder_vocab_size`` rows) plus
  ``final_logits_bias`` when the state_dict has one (M2M100 has none).

With a prefix, the M2M100 rule is applied to the real decoder ids only: the
prefix length never moves a token's position, as for every other model.

It deliberately never calls the model's modules (no ``encoder(...)`` or
``layer(...)``): only parameters/buffers are read, through ``state_dict``, so
that a patch applied to the modules cannot leak into the oracle.  Everything
is computed in ``dtype`` (float64 by default) to make it a high-precision
truth against which float32 results are compared.

This file must not import ``bart_prefix_patch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import transformers
from transformers.activations import ACT2FN

__all__ = [
    "reference_encoder",
    "reference_logits",
    "reference_greedy",
    "reference_sequence_logprob",
    "tiny_config",
    "tiny_model",
    "random_prefix",
    "ModelSpec",
    "MODEL_SPECS",
    "model_spec",
    "marian_sinusoids",
    "m2m100_sinusoids",
    "m2m100_position_ids",
]

# nn.LayerNorm's default; neither BART nor any relative overrides it.
_LN_EPS = 1e-5
_SITES = ("encoder", "decoder", "cross")


@dataclass(frozen=True)
class ModelSpec:
    """What differs between BART and a relative (see the module docstring).

    Attributes:
        pre_ln: LayerNorm before each sub-layer (mBART, Pegasus, Blenderbot, M2M100).
        final_layer_norm: ``{stack}.layer_norm`` after the last layer.
        layernorm_embedding: Per stack: None (absent), ``"sum"`` (after adding
            positions) or ``"tokens"`` (on token embeddings, before positions).
        positions: ``"learned"``, ``"sinusoidal"`` or ``"m2m100"``.
        position_offset: Rows of a learned table before position 0.
        decoder_unscaled_since: First ``(major, minor)`` transformers release
            whose decoder ignores ``scale_embedding`` (None: never).
    """

    pre_ln: bool
    final_layer_norm: bool
    layernorm_embedding: tuple  # (encoder, decoder)
    positions: str
    position_offset: int = 0
    decoder_unscaled_since: tuple | None = None


_SUM = ("sum", "sum")
_NONE = (None, None)

#: ``config.model_type`` -> switches.  NLLB (dense) checkpoints are ``m2m_100``.
MODEL_SPECS = {
    # BartLearnedPositionalEmbedding (and mBART's, PLBart's) reserves two rows (fairseq legacy).
    "bart": ModelSpec(
        pre_ln=False, final_layer_norm=False, layernorm_embedding=_SUM, positions="learned", position_offset=2
    ),
    "plbart": ModelSpec(
        pre_ln=False, final_layer_norm=False, layernorm_embedding=_SUM, positions="learned", position_offset=2
    ),
    "mbart": ModelSpec(
        pre_ln=True, final_layer_norm=True, layernorm_embedding=_SUM, positions="learned", position_offset=2
    ),
    "marian": ModelSpec(pre_ln=False, final_layer_norm=False, layernorm_embedding=_NONE, positions="sinusoidal"),
    "pegasus": ModelSpec(pre_ln=True, final_layer_norm=True, layernorm_embedding=_NONE, positions="sinusoidal"),
    "blenderbot": ModelSpec(pre_ln=True, final_layer_norm=True, layernorm_embedding=_NONE, positions="learned"),
    # From transformers 4.53 on, BlenderbotSmallDecoder no longer multiplies its token
    # embeddings by embed_scale (its encoder still does).  The decoder's
    # layernorm_embedding follows at once, so this only shows through the
    # LayerNorm epsilon (~1e-4 on the tiny models), but the oracle is exact.
    "blenderbot-small": ModelSpec(
        pre_ln=False,
        final_layer_norm=False,
        layernorm_embedding=("sum", "tokens"),
        positions="learned",
        decoder_unscaled_since=(4, 53),
    ),
    "m2m_100": ModelSpec(pre_ln=True, final_layer_norm=True, layernorm_embedding=_NONE, positions="m2m100"),
}


_TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def model_spec(config) -> ModelSpec:
    """The switches for ``config.model_type``.

    Raises:
        TypeError: For a model type the reference does not know.
    """
    spec = MODEL_SPECS.get(getattr(config, "model_type", None))
    if spec is None:
        raise TypeError(f"reference: unsupported model_type {getattr(config, 'model_type', None)!r}")
    return spec


# --------------------------------------------------------------------------
# Weight extraction
# --------------------------------------------------------------------------


@dataclass
class _Weights:
    """Weights of one BART(-family) model, cast to the reference dtype.

    Attributes:
        config: The model config.
        spec: The model type's switches.
        tensors: Parameter/buffer name (relative to the base model) to tensor.
        lm_head: LM head weight, or None for a bare base model.
        final_logits_bias: ``(1, vocab)`` bias, or None (bare model, or M2M100).
        dtype: Computation dtype.
        device: Device of the weights.
    """

    config: Any
    spec: ModelSpec
    tensors: dict
    lm_head: torch.Tensor | None
    final_logits_bias: torch.Tensor | None
    dtype: torch.dtype
    device: torch.device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def sub(self, prefix: str) -> dict:
        """Returns the tensors under ``prefix`` with that prefix stripped."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _check_spec(spec: ModelSpec, tensors: dict, model_type: str) -> None:
    """Fails loudly if the state_dict's layout contradicts the spec table."""
    expected = {
        "encoder.layer_norm.weight": spec.final_layer_norm,
        "decoder.layer_norm.weight": spec.final_layer_norm,
        "encoder.layernorm_embedding.weight": spec.layernorm_embedding[0] is not None,
        "decoder.layernorm_embedding.weight": spec.layernorm_embedding[1] is not None,
    }
    if spec.positions == "learned":
        expected["encoder.embed_positions.weight"] = True
        expected["decoder.embed_positions.weight"] = True
    for key, present in expected.items():
        if (key in tensors) != present:
            raise TypeError(
                f"reference: {model_type} spec says {key} is {'present' if present else 'absent'}, "
                "the state_dict disagrees"
            )


def _extract_weights(model: torch.nn.Module, dtype: torch.dtype) -> _Weights:
    """Reads a seq2seq head's or bare base model's weights.

    Args:
        model: e.g. ``BartForConditionalGeneration``/``BartModel``, ``MarianMTModel``,
            ``M2M100ForConditionalGeneration`` (any type in :data:`MODEL_SPECS`).
        dtype: Target floating dtype.

    Returns:
        The weights, detached and cast to ``dtype``.
    """
    spec = model_spec(model.config)
    state = model.state_dict()
    # A ...ForConditionalGeneration nests the base model under "model.".
    base = "model." if any(k.startswith("model.encoder.") for k in state) else ""
    if not any(k.startswith(base + "encoder.") for k in state):
        raise TypeError(f"{type(model).__name__} does not look like a BART model (no encoder weights)")
    tensors = {k[len(base):]: v.detach().to(dtype) for k, v in state.items() if k.startswith(base)}

    # Tied embeddings may be deduplicated out of a state_dict; fall back to
    # the shared table, which is what the stock modules would use.
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_tokens.weight"
        if key not in tensors:
            tensors[key] = tensors["shared.weight"]
    _check_spec(spec, tensors, model.config.model_type)

    lm_head = final_logits_bias = None
    if base:
        head = state.get("lm_head.weight")
        if head is None:
            # Tied head: the decoder's input table (Marian's may be its own,
            # decoder_vocab_size rows, when embeddings are not shared).
            head = tensors["decoder.embed_tokens.weight"]
        lm_head = head.detach().to(dtype)
        bias = state.get("final_logits_bias")
        if bias is not None:
            final_logits_bias = bias.detach().to(dtype)
    anchor = "encoder.embed_positions.weight"
    device = tensors[anchor if anchor in tensors else "encoder.embed_tokens.weight"].device
    return _Weights(model.config, spec, tensors, lm_head, final_logits_bias, dtype, device)


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def _layer_norm(x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], _LN_EPS)


def _linear(x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, num_heads, d // num_heads).transpose(1, 2)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turns a boolean ``(B, Tq, Tk)`` mask into an additive ``(B, 1, Tq, Tk)`` one."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def _prefix_pair(
    prefix: Any, site: str, layer: int, num_layers: int, batch: int, num_heads: int, head_dim: int, w: _Weights
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fetches, validates and broadcasts one layer's prefix key/value.

    Args:
        prefix: Prefix object (``.encoder``/``.decoder``/``.cross``) or None.
        site: Which attribute to read.
        layer: Layer index within the stack.
        num_layers: Number of layers of that stack (for validation).
        batch: Real batch size.
        num_heads: Heads of the attention the prefix feeds.
        head_dim: Per-head width.
        w: Weights (for dtype/device).

    Returns:
        ``(key, value)`` of shape ``(batch, heads, P, head_dim)`` in the
        reference dtype, or None if the site carries no prefix.

    Raises:
        ValueError: If the prefix has the wrong number of layers or shape.
    """
    if prefix is None:
        return None
    pairs = getattr(prefix, site, None)
    if pairs is None:
        return None
    if len(pairs) != num_layers:
        raise ValueError(f"prefix.{site} has {len(pairs)} layers, expected {num_layers}")
    key, value = pairs[layer]
    out = []
    for name, t in (("key", key), ("value", value)):
        if t.dim() != 4 or t.shape[1] != num_heads or t.shape[3] != head_dim or t.shape[0] not in (1, batch):
            raise ValueError(
                f"prefix.{site}[{layer}] {name} has shape {tuple(t.shape)}, expected "
                f"(1 or {batch}, {num_heads}, P, {head_dim})"
            )
        # Not detached: called outside no_grad, the reference is differentiable in the prefix
        # (tests/test_compile_prefix.py's gradient reference); weights stay detached.
        out.append(t.to(device=w.device, dtype=w.dtype).expand(batch, -1, -1, -1))
    if out[0].shape[2] != out[1].shape[2]:
        raise ValueError(f"prefix.{site}[{layer}] key and value lengths differ")
    return out[0], out[1]


def _attention(
    x_q: torch.Tensor,
    x_kv: torch.Tensor,
    p: dict,
    num_heads: int,
    allowed_real: torch.Tensor,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Multi-head attention with an optional always-visible prefix.

    Args:
        x_q: Query-side hidden states ``(B, Tq, d)``.
        x_kv: Key/value-side hidden states ``(B, Tk, d)``.
        p: Attention weights (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        num_heads: Number of heads.
        allowed_real: Boolean ``(B, Tq, Tk)``: which real keys each query sees.
        prefix_kv: Optional ``(key, value)`` each ``(B, H, P, head_dim)``.

    Returns:
        Attention output after ``out_proj``, ``(B, Tq, d)``.
    """
    b, tq, d = x_q.shape
    head_dim = d // num_heads
    q = _split_heads(_linear(x_q, p, "q_proj"), num_heads)
    k = _split_heads(_linear(x_kv, p, "k_proj"), num_heads)
    v = _split_heads(_linear(x_kv, p, "v_proj"), num_heads)
    allowed = allowed_real
    if prefix_kv is not None:
        pk, pv = prefix_kv
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        # Prefix columns are never masked: neither causality nor padding
        # applies to them.
        visible = torch.ones(b, tq, pk.shape[2], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([visible, allowed_real], dim=2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * head_dim**-0.5
    scores = scores + _additive(allowed, scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, tq, d)
    return _linear(out, p, "out_proj")


def marian_sinusoids(num_positions: int, dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Marian/Pegasus' fixed table: ``sin`` features in the first half, ``cos`` in the second.

    Row ``p``, feature pair ``j``: angle ``p / 10000 ** (2 j / dim)``.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    sentinel = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out = torch.empty(num_positions, dim, dtype=torch.float64)
    out[:, :sentinel] = torch.sin(angle[:, 0::2])
    out[:, sentinel:] = torch.cos(angle[:, 1::2])
    return out.to(dtype)


def m2m100_sinusoids(num_positions: int, dim: int, padding_idx: int | None, dtype: torch.dtype = torch.float64):
    """M2M100's (fairseq/tensor2tensor) table: ``[sin | cos]``, row ``padding_idx`` zero."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(num_positions, dtype=torch.float64)[:, None] * freq[None]
    out = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if dim % 2 == 1:
        out = torch.cat([out, torch.zeros(num_positions, 1, dtype=torch.float64)], dim=1)
    if padding_idx is not None:
        out[padding_idx] = 0
    return out.to(dtype)


def m2m100_position_ids(ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """fairseq ``make_positions``: pads -> ``padding_idx``; the k-th non-pad token -> ``padding_idx + k``."""
    real = (ids != padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def _position_embeddings(w: _Weights, stack: str, ids: torch.Tensor) -> torch.Tensor:
    """``(B or 1, T, d)`` position embeddings of ``ids`` (positions never depend on a prefix)."""
    spec, cfg = w.spec, w.config
    length = ids.shape[1]
    if spec.positions == "m2m100":
        pad = cfg.pad_token_id
        position_ids = m2m100_position_ids(ids, pad)
        rows = max(int(position_ids.max()) + 1, pad + 1) if length else pad + 1
        table = m2m100_sinusoids(rows, cfg.d_model, pad, w.dtype).to(w.device)
        return F.embedding(position_ids, table)
    # Positions restart at 0 for every sequence; in particular the decoder's
    # do not shift by the prefix length.
    positions = torch.arange(length, device=ids.device) + spec.position_offset
    key = f"{stack}.embed_positions.weight"
    if key in w.tensors:
        table = w[key]
    else:  # a sinusoidal table that a release keeps out of the state_dict
        table = marian_sinusoids(length, cfg.d_model, w.dtype).to(w.device)
    return F.embedding(positions, table)[None]


def _embed(w: _Weights, stack: str, ids: torch.Tensor) -> torch.Tensor:
    """Token embedding * embed_scale + position, with ``layernorm_embedding`` where the model has one."""
    cfg, spec = w.config, w.spec
    scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
    if stack == "decoder" and spec.decoder_unscaled_since and _TRANSFORMERS_VERSION >= spec.decoder_unscaled_since:
        scale = 1.0
    tokens = F.embedding(ids, w[f"{stack}.embed_tokens.weight"]) * scale
    positions = _position_embeddings(w, stack, ids)
    where = spec.layernorm_embedding[0 if stack == "encoder" else 1]
    if where == "tokens":
        return _layer_norm(tokens, w.tensors, f"{stack}.layernorm_embedding") + positions
    hidden = tokens + positions
    if where == "sum":
        hidden = _layer_norm(hidden, w.tensors, f"{stack}.layernorm_embedding")
    return hidden


def _ffn(h: torch.Tensor, p: dict, act) -> torch.Tensor:
    return _linear(act(_linear(h, p, "fc1")), p, "fc2")


def _as_bool_mask(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.to(device) != 0


# --------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------


def _encode(w: _Weights, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefix: Any):
    """Runs the encoder; returns ``(last_hidden_state, bool padding mask)``."""
    cfg = w.config
    input_ids = input_ids.to(w.device)
    bsz, src_len = input_ids.shape
    enc_mask = _as_bool_mask(attention_mask, (bsz, src_len), w.device)
    heads = cfg.encoder_attention_heads
    head_dim = cfg.d_model // heads
    act = ACT2FN[cfg.activation_function]
    # Padding hides keys only; padded queries still compute (and are ignored
    # downstream), exactly as the stock bidirectional mask does.
    allowed = enc_mask[:, None, :].expand(bsz, src_len, src_len)

    pre_ln = w.spec.pre_ln
    h = _embed(w, "encoder", input_ids)
    for i in range(cfg.encoder_layers):
        p = w.sub(f"encoder.layers.{i}.")
        pkv = _prefix_pair(prefix, "encoder", i, cfg.encoder_layers, bsz, heads, head_dim, w)
        if pre_ln:
            x = _layer_norm(h, p, "self_attn_layer_norm")
            h = h + _attention(x, x, w.sub(f"encoder.layers.{i}.self_attn."), heads, allowed, pkv)
            h = h + _ffn(_layer_norm(h, p, "final_layer_norm"), p, act)
        else:
            attn = _attention(h, h, w.sub(f"encoder.layers.{i}.self_attn."), heads, allowed, pkv)
            h = _layer_norm(h + attn, p, "self_attn_layer_norm")
            h = _layer_norm(h + _ffn(h, p, act), p, "final_layer_norm")
    if w.spec.final_layer_norm:
        h = _layer_norm(h, w.tensors, "encoder.layer_norm")
    return h, enc_mask


def _decode(
    w: _Weights,
    encoder_hidden: torch.Tensor,
    enc_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor | None,
    prefix: Any,
) -> torch.Tensor:
    """Runs the decoder (teacher forced); returns LM logits or hidden states."""
    cfg = w.config
    decoder_input_ids = decoder_input_ids.to(w.device)
    bsz, tgt_len = decoder_input_ids.shape
    src_len = encoder_hidden.shape[1]
    if encoder_hidden.shape[0] != bsz:
        raise ValueError("decoder batch does not match encoder batch")
    dec_mask = _as_bool_mask(decoder_attention_mask, (bsz, tgt_len), w.device)
    heads = cfg.decoder_attention_heads
    head_dim = cfg.d_model // heads
    act = ACT2FN[cfg.activation_function]

    causal = torch.ones(tgt_len, tgt_len, dtype=torch.bool, device=w.device).tril()
    self_allowed = causal[None] & dec_mask[:, None, :]
    cross_allowed = enc_mask[:, None, :].expand(bsz, tgt_len, src_len)

    pre_ln = w.spec.pre_ln
    h = _embed(w, "decoder", decoder_input_ids)
    for i in range(cfg.decoder_layers):
        p = w.sub(f"decoder.layers.{i}.")
        self_kv = _prefix_pair(prefix, "decoder", i, cfg.decoder_layers, bsz, heads, head_dim, w)
        cross_kv = _prefix_pair(prefix, "cross", i, cfg.decoder_layers, bsz, heads, head_dim, w)
        self_p = w.sub(f"decoder.layers.{i}.self_attn.")
        cross_p = w.sub(f"decoder.layers.{i}.encoder_attn.")
        if pre_ln:
            x = _layer_norm(h, p, "self_attn_layer_norm")
            h = h + _attention(x, x, self_p, heads, self_allowed, self_kv)
            x = _layer_norm(h, p, "encoder_attn_layer_norm")
            h = h + _attention(x, encoder_hidden, cross_p, heads, cross_allowed, cross_kv)
            h = h + _ffn(_layer_norm(h, p, "final_layer_norm"), p, act)
        else:
            attn = _attention(h, h, self_p, heads, self_allowed, self_kv)
            h = _layer_norm(h + attn, p, "self_attn_layer_norm")
            attn = _attention(h, encoder_hidden, cross_p, heads, cross_allowed, cross_kv)
            h = _layer_norm(h + attn, p, "encoder_attn_layer_norm")
            h = _layer_norm(h + _ffn(h, p, act), p, "final_layer_norm")
    if w.spec.final_layer_norm:
        h = _layer_norm(h, w.tensors, "decoder.layer_norm")

    if w.lm_head is None:
        return h
    logits = F.linear(h, w.lm_head)
    if w.final_logits_bias is not None:
        logits = logits + w.final_logits_bias
    return logits


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def reference_encoder(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix: Any = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Computes the encoder's last hidden state with an optional prefix.

    Args:
        model: ``BartForConditionalGeneration`` or ``BartModel`` (only weights are read).
        input_ids: ``(B, S)`` token ids.
        attention_mask: Optional ``(B, S)`` 1/0 padding mask.
        prefix: Optional object with ``.encoder`` (other sites are ignored here).
        dtype: Computation dtype.

    Returns:
        ``(B, S, d_model)`` tensor in ``dtype``.
    """
    w = _extract_weights(model, dtype)
    with torch.no_grad():
        return _encode(w, input_ids, attention_mask, prefix)[0]


def reference_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
    prefix: Any = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Computes teacher-forced LM logits with an optional prefix.

    Args:
        model: ``BartForConditionalGeneration`` or ``BartModel`` (only weights are read).
        input_ids: ``(B, S)`` encoder token ids.
        decoder_input_ids: ``(B, T)`` decoder token ids.
        attention_mask: Optional ``(B, S)`` encoder padding mask.
        decoder_attention_mask: Optional ``(B, T)`` decoder padding mask; it
            hides padded decoder tokens as keys only.
        prefix: Optional object with ``.encoder``, ``.decoder``, ``.cross``.
        dtype: Computation dtype.

    Returns:
        ``(B, T, vocab)`` logits, or for a bare ``BartModel`` the ``(B, T, d_model)``
        decoder last hidden state.
    """
    w = _extract_weights(model, dtype)
    with torch.no_grad():
        enc, enc_mask = _encode(w, input_ids, attention_mask, prefix)
        return _decode(w, enc, enc_mask, decoder_input_ids, decoder_attention_mask, prefix)


def _eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _generation_setting(model: torch.nn.Module, name: str):
    """Reads a generation setting from the config, else the generation config.

    transformers 5.x drops unknown kwargs such as ``forced_bos_token_id`` from
    ``BartConfig`` and keeps some of them only on ``model.generation_config``,
    which is what ``generate`` actually consults.
    """
    value = getattr(model.config, name, None)
    if value is None:
        value = getattr(getattr(model, "generation_config", None), name, None)
    return value


def reference_greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    prefix: Any = None,
    dtype: torch.dtype = torch.float64,
) -> torch.LongTensor:
    """Greedy decoding by full teacher-forced recomputation at every step.

    Mirrors ``generate(do_sample=False, num_beams=1, max_new_tokens=n)``: rows
    that emitted EOS are padded with ``pad_token_id`` and decoding stops early
    only once every row has finished.  No KV cache is used, so any cache
    bug in the code under test cannot be mirrored here.

    Note: unlike ``generate``, an ``attention_mask`` of None means "attend to
    every token"; no mask is inferred from pad tokens in ``input_ids``.

    Args:
        model: ``BartForConditionalGeneration`` (an LM head is required).
        input_ids: ``(B, S)`` encoder token ids.
        max_new_tokens: Maximum number of generated tokens.
        attention_mask: Optional ``(B, S)`` encoder padding mask.
        prefix: Optional prefix object.
        dtype: Computation dtype.

    Returns:
        ``(B, 1 + n)`` ids starting with ``decoder_start_token_id``, with
        ``n <= max_new_tokens``.

    Raises:
        TypeError: If the model has no LM head.
    """
    w = _extract_weights(model, dtype)
    if w.lm_head is None:
        raise TypeError("reference_greedy needs a model with an LM head")
    cfg = model.config
    eos_ids = _eos_ids(cfg)
    # generate() substitutes EOS for a missing pad id in the same way.
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    # Tests set both to None; they are honoured so that the oracle still
    # matches generate() on configs (like BART's default) that force them.
    forced_bos = _generation_setting(model, "forced_bos_token_id")
    forced_eos = _generation_setting(model, "forced_eos_token_id")
    start = _generation_setting(model, "decoder_start_token_id")

    with torch.no_grad():
        enc, enc_mask = _encode(w, input_ids, attention_mask, prefix)
        bsz = enc.shape[0]
        seqs = torch.full((bsz, 1), int(start), dtype=torch.long, device=w.device)
        unfinished = torch.ones(bsz, dtype=torch.bool, device=w.device)
        max_length = 1 + max_new_tokens
        eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=w.device)
        for _ in range(max_new_tokens):
            scores = _decode(w, enc, enc_mask, seqs, None, prefix)[:, -1, :]
            cur_len = seqs.shape[1]
            # Same order as generate's processors: ForcedBOS then ForcedEOS,
            # so EOS wins if both fire on the same step.
            if forced_bos is not None and cur_len == 1:
                forced = torch.full_like(scores, -math.inf)
                forced[:, forced_bos] = 0
                scores = forced
            if forced_eos is not None and cur_len == max_length - 1:
                forced = torch.full_like(scores, -math.inf)
                forced[:, forced_eos] = 0
                scores = forced
            next_tokens = scores.argmax(dim=-1)
            if pad_id is not None:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
            seqs = torch.cat([seqs, next_tokens[:, None]], dim=1)
            if eos_ids:
                unfinished &= ~torch.isin(next_tokens, eos_tensor)
                if not unfinished.any():
                    break
        return seqs


def reference_sequence_logprob(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix: Any = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sums log-probabilities of ``sequences[:, 1:]`` under teacher forcing.

    Args:
        model: ``BartForConditionalGeneration`` (an LM head is required).
        input_ids: ``(B, S)`` encoder token ids.
        sequences: ``(B, L)`` ids starting with the decoder start token, as
            returned by ``generate``.
        attention_mask: Optional ``(B, S)`` encoder padding mask.
        prefix: Optional prefix object.
        dtype: Computation dtype.

    Returns:
        ``(B,)`` sums in ``dtype``.  The first generated EOS is counted; pad
        tokens after it are not (the start token, which is EOS for BART, is
        not a generated token and does not count as "first EOS").

    Raises:
        TypeError: If the model has no LM head.
    """
    w = _extract_weights(model, dtype)
    if w.lm_head is None:
        raise TypeError("reference_sequence_logprob needs a model with an LM head")
    cfg = model.config
    sequences = sequences.to(w.device)
    with torch.no_grad():
        enc, enc_mask = _encode(w, input_ids, attention_mask, prefix)
        logits = _decode(w, enc, enc_mask, sequences[:, :-1], None, prefix)
        targets = sequences[:, 1:]
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        eos_ids = _eos_ids(cfg)
        if eos_ids:
            is_eos = torch.isin(targets, torch.tensor(eos_ids, device=w.device)).long()
            after_eos = (torch.cumsum(is_eos, dim=1) - is_eos) > 0
        else:
            after_eos = torch.zeros_like(targets, dtype=torch.bool)
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
        if pad_id is None:
            ignored = torch.zeros_like(after_eos)
        else:
            ignored = after_eos & (targets == pad_id)
        return token_lp.masked_fill(ignored, 0.0).sum(dim=1)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


#: The tiny configuration every test model shares (tests/models.py builds the relatives from it).
TINY_DIMS = dict(
    vocab_size=64,
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    decoder_layerdrop=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    scale_embedding=True,
    init_std=0.2,
)


def tiny_config(**overrides) -> transformers.BartConfig:
    """Builds a tiny BART config for fast tests.

    Encoder and decoder deliberately differ in depth and head count so that
    code mixing them up fails.  ``init_std`` is raised from BART's 0.02 to 0.2:
    with 0.02 the attention scores of a d_model=32 model are ~0.03, attention
    is nearly uniform, and masking or prefix mistakes barely move the output.

    Args:
        **overrides: Any ``BartConfig`` field to override.

    Returns:
        The config.
    """
    return transformers.BartConfig(**{**TINY_DIMS, **overrides})


def tiny_model(seed: int = 0, attn_implementation: str = "eager", **config_overrides):
    """Builds a seeded tiny ``BartForConditionalGeneration`` in eval mode.

    LayerNorm weights/biases, every Linear bias and ``final_logits_bias`` are
    randomised (they are zero/one at init) so a reference that forgot any of
    them would disagree with the stock model.

    Args:
        seed: Seed for ``torch.manual_seed``.
        attn_implementation: ``"eager"`` or ``"sdpa"``.
        **config_overrides: Passed to :func:`tiny_config`.

    Returns:
        The model, in eval mode.
    """
    config = tiny_config(**config_overrides)
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return randomize_(model).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Randomise what init leaves at zero/one (LayerNorms, Linear biases, ``final_logits_bias``), in place.

    A reference that forgot any of them would then disagree with the stock model.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.add_(0.1 * torch.randn_like(module.weight))
            module.bias.add_(0.1 * torch.randn_like(module.bias))
        elif isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.add_(0.1 * torch.randn_like(module.bias))
    bias = getattr(model, "final_logits_bias", None)
    if bias is not None:
        bias.add_(0.5 * torch.randn_like(bias))
    return model


def random_prefix(
    config,
    batch: int = 1,
    enc_len: int = 3,
    dec_len: int = 4,
    cross_len: int = 5,
    sites: Sequence[str] = _SITES,
    scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SimpleNamespace:
    """Draws a random prefix with the right shapes for ``config``.

    Each site uses its own generator, so e.g. ``.encoder`` is identical
    whether or not the other sites are requested.

    Args:
        config: A ``BartConfig`` or any relative's config (``encoder_layers``,
            ``decoder_layers``, ``encoder_attention_heads``, ``decoder_attention_heads``, ``d_model``).
        batch: Leading dimension of every key/value (1 broadcasts).
        enc_len: Prefix length at the encoder self-attention.
        dec_len: Prefix length at the decoder self-attention.
        cross_len: Prefix length at the cross-attention.
        sites: Which of ``"encoder"``, ``"decoder"``, ``"cross"`` to fill.
        scale: Multiplier of the standard-normal draws.
        seed: Base seed.
        dtype: Tensor dtype.

    Returns:
        ``SimpleNamespace(encoder=..., decoder=..., cross=...)``; each is None or
        a tuple of one ``(key, value)`` per layer, shaped
        ``(batch, heads, length, d_model // heads)``.

    Raises:
        ValueError: On an unknown site name.
    """
    unknown = set(sites) - set(_SITES)
    if unknown:
        raise ValueError(f"unknown prefix sites {sorted(unknown)}")
    spec = {
        "encoder": (config.encoder_layers, config.encoder_attention_heads, enc_len),
        "decoder": (config.decoder_layers, config.decoder_attention_heads, dec_len),
        "cross": (config.decoder_layers, config.decoder_attention_heads, cross_len),
    }
    out = {}
    for index, site in enumerate(_SITES):
        if site not in sites:
            out[site] = None
            continue
        layers, heads, length = spec[site]
        gen = torch.Generator().manual_seed(seed * len(_SITES) + index)
        shape = (batch, heads, length, config.d_model // heads)
        out[site] = tuple(
            (
                (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype),
                (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype),
            )
            for _ in range(layers)
        )
    return SimpleNamespace(**out)
