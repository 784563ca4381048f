"""PEFT integration: PEFT's prefix-tuning runs BART the way prefix-tuning is meant to.

Stock PEFT (0.21) hands its prefix to BART as ``past_key_values``: on
transformers 5.x ``generate()`` ignores it, on 4.57 ``generate()`` and the
teacher-forced forward disagree, the cross-attention half it computes is thrown
away (``cross_attention_cache = DynamicCache()``), and the decoder positions
are shifted by the prefix length. With this integration (installed lazily by a
wrapt post-import hook on ``peft``; every wrapped method is in the package's
registry, owner ``"peft"``, removed by :func:`bart_prefix_patch.revert`
or ``bpp.apply(peft=False)``), for a ``PeftModelForSeq2SeqLM`` with a
``PREFIX_TUNING`` adapter on a BART model:

* ``forward`` and ``generate`` compute PEFT's prompt once per call and hand the
  base model ``prefix=Prefix(decoder=..., cross=...)`` (:func:`peft_prefix`)
  instead of a cache; the core patch does the rest (prefix concatenated with the
  real keys/values, cross prefix with the encoder, positions unshifted, stock
  ``generate()`` bookkeeping);
* ``decoder_attention_mask`` covers the real decoder tokens only (PEFT's P
  leading ones are not added);
* adapters saved with the integration carry ``"bart_prefix_patch": {"semantics":
  "full", ...}`` in ``adapter_config.json``; an adapter loaded without that key
  was trained by stock PEFT and runs the way it was trained ("legacy":
  decoder self-attention prefix only, decoder positions shifted by P), in
  forward and in ``generate()``, with a :class:`PeftIntegrationWarning`
  (:func:`set_peft_semantics` opts it in to the full semantics).

Every other PEFT model (LoRA, other tasks, other architectures, disabled
adapters) runs PEFT's own code untouched. See docs/peft.md.

Modules, one concern each: ``_install`` (switching, wrapping PEFT's methods),
``_prompt`` (PEFT's prompt -> :class:`~bart_prefix_patch.Prefix`), ``_positions``
(legacy position shift), ``_marker`` (the adapter-config marker),
``_wrappers`` (PEFT's forward/generate through the core patch), ``_common``.
"""

from __future__ import annotations

from .. import _patcher
from ._common import CONFIG_KEY, ENV_VAR, PeftIntegrationWarning, is_installed
from ._install import configure, wanted
from ._marker import peft_semantics, set_peft_semantics
from ._prompt import peft_prefix


def _on_apply(applied: bool, options: dict) -> None:
    configure(options.get("peft"))


_patcher.register_integration("peft", on_apply=_on_apply, on_revert=configure)

__all__ = [
    "ENV_VAR",
    "CONFIG_KEY",
    "PeftIntegrationWarning",
    "configure",
    "is_installed",
    "peft_prefix",
    "peft_semantics",
    "set_peft_semantics",
    "wanted",
]
