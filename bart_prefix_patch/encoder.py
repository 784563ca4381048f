"""The trainable prefix: :class:`PrefixEncoder` (Li & Liang's reparameterisation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn

from ._constants import SITES
from ._models import core_of, model_dims, site_shape as _site_shape
from .errors import PrefixError
from .prefix import Prefix, execution_device

PrefixLength = Union[int, Mapping[str, int]]


class _SitePrefix(nn.Module):
    """One site's prefix: an MLP over an embedding, or a flat parameter.

    Args:
        length: Prefix length P.
        d_model: Model width.
        layers: Layers of the site's stack.
        hidden_size: Width of the MLP, or None for a flat prefix.
        dropout: Dropout on the produced keys/values (training only).
    """

    def __init__(self, length: int, d_model: int, layers: int, hidden_size: Optional[int], dropout: float):
        super().__init__()
        out = layers * 2 * d_model
        self.length, self.layers, self.d_model = length, layers, d_model
        if hidden_size is None:
            self.flat = nn.Parameter(torch.randn(length, out) * 0.02)
        else:
            # As in Li & Liang and the original code: Embedding -> Linear -> tanh -> Linear.
            self.embedding = nn.Embedding(length, d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden_size), nn.Tanh(), nn.Linear(hidden_size, out))
        self.dropout = nn.Dropout(dropout)

    @property
    def is_flat(self) -> bool:
        return hasattr(self, "flat")

    def forward(self) -> torch.Tensor:
        """``(P, layers * 2 * d_model)`` keys and values of every layer."""
        if self.is_flat:
            return self.dropout(self.flat)
        rows = self.embedding.weight
        if rows.device.type == "meta":
            # Offloaded by accelerate (cpu_offload after attach): only calling the Embedding runs the hook
            # that loads its weight; looking up every position gives the same rows.
            rows = self.embedding(torch.arange(self.length, device=execution_device(self.embedding)))
        return self.dropout(self.mlp(rows))


class PrefixEncoder(nn.Module):
    """Trainable prefixes for some or all of a BART model's attention sites.

    Per site, an ``Embedding(P, d_model) -> Linear(d_model, hidden) -> tanh ->
    Linear(hidden, layers * 2 * d_model)`` (Li & Liang 2021; ``hidden_size=None``
    trains the keys/values directly). Calling the module (no arguments) returns
    a :class:`Prefix` with batch 1, ready for :func:`bart_prefix_patch.attach`.

    Args:
        config: The model's config (a ``BartConfig`` or a relative's).
        prefix_length: One length for every site, or a mapping site -> length.
        sites: Which of ``"encoder"``, ``"decoder"``, ``"cross"`` get a prefix.
        hidden_size: MLP width; None for a flat prefix.
        dropout: Dropout applied to the keys/values in training mode.
    """

    def __init__(
        self,
        config,
        prefix_length: PrefixLength = 20,
        sites: Sequence[str] = SITES,
        hidden_size: Optional[int] = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        sites = tuple(sites)
        unknown = [site for site in sites if site not in SITES]
        if unknown or not sites:
            raise PrefixError(f"sites: expected a non-empty subset of {SITES}, got {sites}")
        lengths = {site: prefix_length for site in sites} if isinstance(prefix_length, int) else dict(prefix_length)
        missing = [site for site in sites if site not in lengths]
        if missing or any(not isinstance(lengths[s], int) or lengths[s] < 1 for s in sites):
            raise PrefixError(f"prefix_length: expected a positive int per site {sites}, got {prefix_length!r}")
        self.dims = model_dims(config)
        self.config = config
        self.sites = sites
        self.prefix_lengths = {site: lengths[site] for site in sites}
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.prefixes = nn.ModuleDict(
            {
                site: _SitePrefix(lengths[site], config.d_model, _site_shape(config, site)[0], hidden_size, dropout)
                for site in sites
            }
        )

    def forward(self) -> Prefix:
        """The current prefix (batch 1), differentiable with respect to the parameters."""
        fields = {}
        for site, module in self.prefixes.items():
            layers, heads = _site_shape(self.config, site)
            values = module()  # (P, layers * 2 * d_model)
            # -> (layers, 2, 1, heads, P, head_dim)
            kv = values.view(module.length, layers, 2, heads, -1).permute(1, 2, 3, 0, 4).unsqueeze(2)
            fields[site] = [(kv[layer, 0], kv[layer, 1]) for layer in range(layers)]
        return Prefix(**fields)

    def config_dict(self) -> dict:
        """What :func:`bart_prefix_patch.save_prefix` records next to the weights."""
        return {
            "prefix_length": dict(self.prefix_lengths),
            "sites": list(self.sites),
            "hidden_size": self.hidden_size,
            "dropout": self.dropout,
            **self.dims,
        }

    @torch.no_grad()
    def to_flat(self) -> "PrefixEncoder":
        """A flat prefix (no MLP) producing exactly this encoder's current keys/values.

        The MLP only helps optimisation; for inference the flat form is smaller
        and skips the MLP. Dropout is not applied.
        """
        flat = PrefixEncoder(self.config, self.prefix_lengths, self.sites, hidden_size=None, dropout=self.dropout)
        for site, module in self.prefixes.items():
            values = module.flat if module.is_flat else module.mlp(module.embedding.weight)
            flat.prefixes[site].flat.copy_(values)
        reference = next(self.parameters())
        return flat.to(device=reference.device, dtype=reference.dtype)

    @classmethod
    @torch.no_grad()
    def from_tokens(
        cls,
        model: nn.Module,
        input_ids: torch.Tensor,
        sites: Sequence[str] = SITES,
        dropout: float = 0.0,
        decoder_input_ids: Optional[torch.Tensor] = None,
    ) -> "PrefixEncoder":
        """A flat prefix initialised with the keys/values the frozen model computes for real text.

        Li & Liang (and the original code) found that initialising the prefix
        with activations of real words matters in low-data training. The
        encoder and cross sites take the projections of ``input_ids`` run
        through the encoder, the decoder site those of ``decoder_input_ids``
        (default: ``input_ids``) run through the decoder; each site's prefix
        length is the number of its tokens.

        Args:
            model: A supported encoder-decoder model (any head containing the bare model).
            input_ids: ``(1, P)`` or ``(P,)`` token ids of the encoder vocabulary.
            sites: Sites to initialise.
            dropout: Dropout of the returned encoder.
            decoder_input_ids: Token ids of the decoder vocabulary, for models
                whose decoder has its own (Marian's ``decoder_vocab_size``).

        Raises:
            PrefixError: Not a supported encoder-decoder model, or ids outside a vocabulary.
        """
        core = core_of(model)
        if core is None or not hasattr(core, "encoder") or not hasattr(core, "decoder"):
            raise PrefixError(f"from_tokens: expected a supported encoder-decoder model, got {type(model).__name__}")
        device = core.encoder.embed_tokens.weight.device
        ids = input_ids.reshape(1, -1).to(device)
        decoder_ids = (ids if decoder_input_ids is None else decoder_input_ids).reshape(1, -1).to(device)
        for name, tensor, stack in (("input_ids", ids, core.encoder), ("decoder_input_ids", decoder_ids, core.decoder)):
            vocabulary = stack.embed_tokens.num_embeddings
            if tensor.numel() == 0 or tensor.min() < 0 or tensor.max() >= vocabulary:
                hint = " (pass decoder_input_ids= in the decoder's vocabulary)" if name == "decoder_input_ids" and decoder_input_ids is None else ""
                raise PrefixError(
                    f"from_tokens: expected {name} in [0, {vocabulary}) (the {'encoder' if stack is core.encoder else 'decoder'}"
                    f" vocabulary), got {tensor.numel()} ids in [{tensor.min().item() if tensor.numel() else '-'}, "
                    f"{tensor.max().item() if tensor.numel() else '-'}]{hint}"
                )
        captured: dict[tuple[str, int, str], torch.Tensor] = {}
        hooks = []
        for site in sites:
            stack = core.encoder.layers if site == "encoder" else core.decoder.layers
            for index, layer in enumerate(stack):
                attention = layer.encoder_attn if site == "cross" else layer.self_attn
                for name in ("k_proj", "v_proj"):
                    hooks.append(
                        getattr(attention, name).register_forward_hook(
                            lambda _m, _i, out, key=(site, index, name): captured.setdefault(key, out.detach())
                        )
                    )
        was_training = core.training
        core.eval()
        try:
            core(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
            core.train(was_training)
        lengths = {site: (decoder_ids if site == "decoder" else ids).shape[1] for site in sites}
        encoder = cls(core.config, lengths, sites, hidden_size=None, dropout=dropout)
        for site in sites:
            length = lengths[site]
            layers = _site_shape(core.config, site)[0]
            # Per layer [k ; v], each (P, d_model): the layout forward() reads back.
            rows = [
                torch.cat([captured[(site, layer, "k_proj")][0], captured[(site, layer, "v_proj")][0]], dim=-1)
                for layer in range(layers)
            ]
            encoder.prefixes[site].flat.copy_(torch.stack(rows, dim=1).reshape(length, -1))
        reference = core.encoder.embed_tokens.weight
        return encoder.to(device=reference.device, dtype=reference.dtype)
