"""A packaged plain-PyTorch BART-with-prefix reference, for the self-check.

The self-check (:mod:`._selfcheck`) verifies a transformers release the
fingerprint table does not know by comparing the patched model with this
module. It must therefore share nothing with the patch: it imports only
``torch``, ``math`` and the standard library (never ``transformers`` nor any
module of this package), reads a model's weights through ``state_dict()``
only (it never calls the model's modules, whose forwards the patch wraps),
and computes eagerly in float64 with autograd left on, so that gradients
with respect to the prefix can be compared too.

The math is BART's: learned positions with an offset of 2 (always
``0..T-1``, whatever the prefix length), optional ``sqrt(d_model)`` embedding
scale, ``layernorm_embedding``, post-LayerNorm layers, ``final_logits_bias``.
Prefix keys/values (Li & Liang, 2021) join the real ones at three sites, and
prefix columns are never masked:

* encoder self-attention: ``[prefix ; tokens]``, padding hides padded tokens;
* decoder self-attention: ``[prefix ; tokens]``, causal over the real tokens;
* cross-attention: ``[prefix ; encoder output]``, the encoder padding mask
  applies to the encoder part only.

Config values are read by attribute name (``d_model``, ``scale_embedding``,
``activation_function``, ...) so BART's relatives can be added later; the
structure (post-LN, offset-2 positions) is BART's. ``tests/reference.py``
is the test suite's own, separately written oracle;
``tests/test_packaged_reference.py`` proves the two agree.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["logits", "encoder_states", "greedy", "sequence_logprob"]

_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's two reserved rows
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which BART uses

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class _Weights:
    """A model's tensors (relative to the encoder-decoder core) in the reference dtype."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        state = model.state_dict()
        base = "model." if any(k.startswith("model.encoder.") for k in state) else ""
        if not any(k.startswith(base + "encoder.") for k in state):
            raise TypeError(f"{type(model).__name__} has no encoder weights: not a BART model")
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.dtype = dtype
        self.t = {k[len(base):]: v.detach().to(dtype) for k, v in state.items() if k.startswith(base)}
        for stack in ("encoder", "decoder"):  # tied embeddings may be deduplicated out of the state dict
            self.t.setdefault(f"{stack}.embed_tokens.weight", self.t["shared.weight"])
        self.lm_head = self.bias = None
        if base:
            head = state.get("lm_head.weight", state[base + "shared.weight"])
            self.lm_head = head.detach().to(dtype)
            bias = state.get("final_logits_bias")
            self.bias = None if bias is None else bias.detach().to(dtype)
        self.device = self.t["shared.weight"].device
        name = getattr(self.config, "activation_function", "gelu")
        if name not in _ACTIVATIONS:
            raise ValueError(f"reference: unsupported activation_function {name!r}")
        self.act = _ACTIVATIONS[name]
        self.eps = getattr(self.config, "layer_norm_eps", _LAYER_NORM_EPS)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.t[name + ".weight"], self.t[name + ".bias"], self.eps)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.t[name + ".weight"], self.t.get(name + ".bias"))


def _prefix_kv(prefix: Any, site: str, layer: int, batch: int, w: _Weights):
    pairs = getattr(prefix, site, None) if prefix is not None else None
    if not pairs:
        return None
    key, value = pairs[layer]
    # .to() keeps the autograd graph, so gradients reach the caller's prefix tensors.
    return tuple(t.to(device=w.device, dtype=w.dtype).expand(batch, -1, -1, -1) for t in (key, value))


def _attend(w: _Weights, name: str, heads: int, x_q, x_kv, allowed, prefix_kv):
    """Multi-head attention over ``[prefix ; keys]``; ``allowed`` is ``(B, Tq, Tk)`` bool for real keys."""
    batch, q_len, width = x_q.shape
    head_dim = width // heads

    def split(x):
        return x.view(batch, x.shape[1], heads, head_dim).transpose(1, 2)

    q = split(w.linear(x_q, name + ".q_proj"))
    k = split(w.linear(x_kv, name + ".k_proj"))
    v = split(w.linear(x_kv, name + ".v_proj"))
    if prefix_kv is not None:
        k = torch.cat([prefix_kv[0], k], dim=2)
        v = torch.cat([prefix_kv[1], v], dim=2)
        visible = torch.ones(batch, q_len, prefix_kv[0].shape[2], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([visible, allowed], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, q_len, width)
    return w.linear(out, name + ".out_proj")


def _embed(w: _Weights, stack: str, ids: torch.Tensor) -> torch.Tensor:
    scale = math.sqrt(w.config.d_model) if getattr(w.config, "scale_embedding", False) else 1.0
    positions = torch.arange(ids.shape[1], device=w.device) + _POSITION_OFFSET  # never shifted by a prefix
    hidden = F.embedding(ids, w.t[f"{stack}.embed_tokens.weight"]) * scale
    hidden = hidden + F.embedding(positions, w.t[f"{stack}.embed_positions.weight"])[None]
    return w.norm(hidden, f"{stack}.layernorm_embedding")


def _padding(mask: Optional[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device) != 0


def _encode(w: _Weights, ids: torch.Tensor, mask: Optional[torch.Tensor], prefix: Any):
    ids = ids.to(w.device)
    batch, length = ids.shape
    keep = _padding(mask, ids)
    allowed = keep[:, None, :].expand(batch, length, length)
    heads = w.config.encoder_attention_heads
    h = _embed(w, "encoder", ids)
    for i in range(w.config.encoder_layers):
        layer = f"encoder.layers.{i}"
        attn = _attend(w, layer + ".self_attn", heads, h, h, allowed, _prefix_kv(prefix, "encoder", i, batch, w))
        h = w.norm(h + attn, layer + ".self_attn_layer_norm")
        h = w.norm(h + w.linear(w.act(w.linear(h, layer + ".fc1")), layer + ".fc2"), layer + ".final_layer_norm")
    return h, keep


def _decode(w: _Weights, enc: torch.Tensor, enc_keep: torch.Tensor, ids: torch.Tensor,
            mask: Optional[torch.Tensor], prefix: Any) -> torch.Tensor:
    ids = ids.to(w.device)
    batch, length = ids.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=w.device).tril()
    self_allowed = causal[None] & _padding(mask, ids)[:, None, :]
    cross_allowed = enc_keep[:, None, :].expand(batch, length, enc.shape[1])
    heads = w.config.decoder_attention_heads
    h = _embed(w, "decoder", ids)
    for i in range(w.config.decoder_layers):
        layer = f"decoder.layers.{i}"
        attn = _attend(w, layer + ".self_attn", heads, h, h, self_allowed, _prefix_kv(prefix, "decoder", i, batch, w))
        h = w.norm(h + attn, layer + ".self_attn_layer_norm")
        attn = _attend(w, layer + ".encoder_attn", heads, h, enc, cross_allowed, _prefix_kv(prefix, "cross", i, batch, w))
        h = w.norm(h + attn, layer + ".encoder_attn_layer_norm")
        h = w.norm(h + w.linear(w.act(w.linear(h, layer + ".fc1")), layer + ".fc2"), layer + ".final_layer_norm")
    if w.lm_head is None:
        return h
    out = F.linear(h, w.lm_head)
    return out if w.bias is None else out + w.bias


def encoder_states(model, input_ids, attention_mask=None, prefix=None, dtype=torch.float64) -> torch.Tensor:
    """The encoder's last hidden state ``(B, S, d_model)`` with an optional encoder prefix."""
    return _encode(_Weights(model, dtype), input_ids, attention_mask, prefix)[0]


def logits(model, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
           prefix=None, dtype=torch.float64) -> torch.Tensor:
    """Teacher-forced LM logits ``(B, T, vocab)`` (a bare core model: decoder hidden states).

    ``prefix`` is any object with ``.encoder`` / ``.decoder`` / ``.cross``
    lists of ``(key, value)`` pairs shaped ``(1 or B, heads, P, head_dim)``
    (``bart_prefix_patch.Prefix`` fits); gradients flow back to them.
    """
    w = _Weights(model, dtype)
    enc, keep = _encode(w, input_ids, attention_mask, prefix)
    return _decode(w, enc, keep, decoder_input_ids, decoder_attention_mask, prefix)


def _setting(w: _Weights, name: str):
    value = getattr(w.generation_config, name, None) if w.generation_config is not None else None
    return getattr(w.config, name, None) if value is None else value


def _eos_ids(w: _Weights) -> list[int]:
    eos = _setting(w, "eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def greedy(model, input_ids, max_new_tokens: int, attention_mask=None, prefix=None,
           dtype=torch.float64) -> torch.Tensor:
    """Greedy decoding that recomputes the whole decoder at every step (no cache).

    Mirrors ``generate(do_sample=False, num_beams=1, max_new_tokens=n)``:
    starts from ``decoder_start_token_id``, honours forced BOS/EOS, pads
    finished rows with ``pad_token_id`` and stops once every row is done.
    """
    w = _Weights(model, dtype)
    if w.lm_head is None:
        raise TypeError("greedy() needs a model with an LM head")
    eos = _eos_ids(w)
    pad = _setting(w, "pad_token_id")
    pad = eos[0] if pad is None and eos else pad
    forced_bos, forced_eos = _setting(w, "forced_bos_token_id"), _setting(w, "forced_eos_token_id")
    enc, keep = _encode(w, input_ids, attention_mask, prefix)
    seqs = torch.full((enc.shape[0], 1), int(_setting(w, "decoder_start_token_id")), dtype=torch.long, device=w.device)
    unfinished = torch.ones(enc.shape[0], dtype=torch.bool, device=w.device)
    for step in range(max_new_tokens):
        scores = _decode(w, enc, keep, seqs, None, prefix)[:, -1]
        for forced, when in ((forced_bos, step == 0), (forced_eos, step == max_new_tokens - 1)):
            if forced is not None and when:
                scores = torch.full_like(scores, -math.inf)
                scores[:, forced] = 0
        tokens = scores.argmax(-1)
        if pad is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
        if eos:
            unfinished &= ~torch.isin(tokens, torch.tensor(eos, device=w.device))
            if not unfinished.any():
                break
    return seqs


@torch.no_grad()
def sequence_logprob(model, input_ids, sequences, attention_mask=None, prefix=None,
                     dtype=torch.float64) -> torch.Tensor:
    """Teacher-forced ``log p(sequences[:, 1:])`` per row ``(B,)``: counts up to the first EOS, not the pads after it."""
    w = _Weights(model, dtype)
    enc, keep = _encode(w, input_ids, attention_mask, prefix)
    sequences = sequences.to(w.device)
    targets = sequences[:, 1:]
    token_lp = _decode(w, enc, keep, sequences[:, :-1], None, prefix).log_softmax(-1)
    token_lp = token_lp.gather(-1, targets[..., None]).squeeze(-1)
    eos = _eos_ids(w)
    is_eos = torch.isin(targets, torch.tensor(eos, device=w.device)).long() if eos else torch.zeros_like(targets)
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    pad = _setting(w, "pad_token_id")
    pad = eos[0] if pad is None and eos else pad
    ignored = after_eos & (targets == pad) if pad is not None else torch.zeros_like(after_eos)
    return token_lp.masked_fill(ignored, 0.0).sum(1)
