"""Correct prefix-tuning for BART-family models in Hugging Face transformers.

Importing this package patches transformers (idempotently): prefixes on
encoder self-attention, decoder self-attention and cross-attention are
concatenated with the real keys/values, real tokens keep their positions,
padding is respected, and stock ``model.generate()`` works unchanged.

Example:
    >>> import bart_prefix_patch as bpp
    >>> logits = model(input_ids, decoder_input_ids=ids, prefix=bpp.Prefix(decoder=pairs)).logits
    >>> tokens = model.generate(input_ids, prefix=prefix, num_beams=4)

This module wires the layers together (docs/how-it-works.md): it imports
the integrations, which register their hooks with the patcher, and then
applies the patch.
"""

from ._attach import attach, attached, detach
from ._patcher import apply, gate, get_original, is_applied, revert
from ._version import __version__
from .bank import PrefixBank
from .encoder import PrefixEncoder
from .errors import (
    BartPrefixPatchError,
    PatchNotAppliedError,
    PrefixAttributeError,
    PrefixError,
    PrefixMisplacedError,
    UnsupportedConfigurationError,
    UnsupportedModelError,
    UnsupportedTransformersError,
)
from .io import load_prefix, save_prefix
from .prefix import Prefix
from .tuning import add_prefix_tuning, trainable_parameters

# Integrations: importing them registers their apply/revert hooks.
from . import _saving, trainer  # noqa: E402,F401  (isort: skip)
from ._peft import PeftIntegrationWarning, peft_prefix, peft_semantics, set_peft_semantics  # noqa: E402

__all__ = [
    "Prefix",
    "PrefixEncoder",
    "PrefixBank",
    "add_prefix_tuning",
    "trainable_parameters",
    "save_prefix",
    "load_prefix",
    "apply",
    "revert",
    "is_applied",
    "attach",
    "detach",
    "attached",
    "gate",
    "get_original",
    "BartPrefixPatchError",
    "PatchNotAppliedError",
    "PrefixError",
    "PrefixMisplacedError",
    "PrefixAttributeError",
    "UnsupportedConfigurationError",
    "UnsupportedModelError",
    "UnsupportedTransformersError",
    "PeftIntegrationWarning",
    "peft_prefix",
    "peft_semantics",
    "set_peft_semantics",
    "__version__",
]

apply()
