"""Exceptions raised by bart_prefix_patch.

Every error names what was expected and what was given, so that a user can
fix the call without reading this package's source.
"""


class BartPrefixPatchError(Exception):
    """Base class of every error raised by this package."""


class PrefixError(BartPrefixPatchError, ValueError):
    """A prefix does not fit the model or the call (shape, layers, heads, batch, device)."""


class UnsupportedModelError(PrefixError):
    """A prefix was given to a model this package does not support (its attention would ignore it)."""


class PatchNotAppliedError(BartPrefixPatchError, RuntimeError):
    """A prefix was given while the patch is not applied (reverted or refused by the version gate)."""


class UnsupportedTransformersError(BartPrefixPatchError, RuntimeError):
    """The installed transformers release is not one this package knows (``apply(strict=True)``)."""


class UnsupportedConfigurationError(BartPrefixPatchError, ValueError):
    """A prefix was combined with something it cannot run with (static cache, flash/flex attention, ...)."""


class PrefixMisplacedError(BartPrefixPatchError, TypeError):
    """A Prefix reached code that treats it as a cache object while the patch is applied.

    Either the model class is not one this package patches (another
    architecture), or the Prefix was passed where a cache goes in code below
    a BART model's entry points (a layer or attention module called directly,
    a ``Cache`` helper).
    """


class PrefixAttributeError(BartPrefixPatchError, AttributeError):
    """An attribute a :class:`~bart_prefix_patch.Prefix` does not have was looked up.

    An ``AttributeError``, so ``hasattr(prefix, name)`` is False and duck-typing
    probes (accelerate's ``send_to_device`` asks for ``.to``) pass the Prefix
    through untouched. The instances actually raised also derive from
    :class:`PatchNotAppliedError` or :class:`PrefixMisplacedError`, whichever
    names the cause, so stock code that uses the Prefix as a cache still fails
    with that cause in the message.
    """


# The concrete classes Prefix.__getattr__ raises: an AttributeError (probes
# stay False) that is also the error of the real cause (callers catching
# PatchNotAppliedError or PrefixMisplacedError see it).
class _NotAppliedAttributeError(PrefixAttributeError, PatchNotAppliedError):
    pass


class _MisplacedAttributeError(PrefixAttributeError, PrefixMisplacedError):
    pass
