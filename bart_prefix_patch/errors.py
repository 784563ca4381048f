"""Exceptions raised by bart_prefix_patch.

Every error names what was expected and what was given, so that a user can
fix the call without reading this package's source.
"""


class BartPrefixPatchError(Exception):
    """Base class of every error raised by this package."""


class PrefixError(BartPrefixPatchError, ValueError):
    """A prefix does not fit the model or the call (shape, layers, heads, batch, device)."""


class PatchNotAppliedError(BartPrefixPatchError, RuntimeError):
    """A prefix was given while the patch is not applied (reverted or refused by the version gate)."""


class UnsupportedTransformersError(BartPrefixPatchError, RuntimeError):
    """The installed transformers release is not one this package knows (``apply(strict=True)``)."""


class UnsupportedConfigurationError(BartPrefixPatchError, ValueError):
    """A prefix was combined with something it cannot run with (static cache, flash/flex attention, ...)."""
