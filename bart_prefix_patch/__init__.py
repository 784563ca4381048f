"""Correct prefix-tuning for BART-family models in Hugging Face transformers.

Importing this package patches transformers (idempotently): prefixes on
encoder self-attention, decoder self-attention and cross-attention are
concatenated with the real keys/values, real tokens keep their positions,
padding is respected, and stock ``model.generate()`` works unchanged.

Example:
    >>> import bart_prefix_patch as bpp
    >>> logits = model(input_ids, decoder_input_ids=ids, prefix=bpp.Prefix(decoder=pairs)).logits
    >>> tokens = model.generate(input_ids, prefix=prefix, num_beams=4)
"""

from ._patcher import apply, attach, attached, detach, gate, get_original, is_applied, revert
from .errors import (
    BartPrefixPatchError,
    PatchNotAppliedError,
    PrefixAttributeError,
    PrefixError,
    PrefixMisplacedError,
    UnsupportedConfigurationError,
    UnsupportedTransformersError,
)
from .encoder import PrefixEncoder
from .io import load_prefix, save_prefix
from ._peft import PeftIntegrationWarning, peft_prefix, peft_semantics, set_peft_semantics
from .prefix import Prefix
from .tuning import add_prefix_tuning, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "Prefix",
    "PrefixEncoder",
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
    "UnsupportedTransformersError",
    "PeftIntegrationWarning",
    "peft_prefix",
    "peft_semantics",
    "set_peft_semantics",
    "__version__",
]

apply()
