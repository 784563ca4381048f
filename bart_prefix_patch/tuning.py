"""One-call prefix-tuning set-up: build, attach, freeze; parameter accounting."""

from __future__ import annotations

import torch

from ._patcher import attach
from .encoder import PrefixEncoder


def add_prefix_tuning(model: torch.nn.Module, **encoder_kwargs) -> PrefixEncoder:
    """Build a :class:`PrefixEncoder`, attach it, and freeze every base parameter.

    Args:
        model: A BART model.
        **encoder_kwargs: Passed to :class:`PrefixEncoder` (``prefix_length``,
            ``sites``, ``hidden_size``, ``dropout``).

    Returns:
        The attached encoder (on the model's device and dtype). Its parameters
        are the only trainable ones; :func:`bart_prefix_patch.detach` restores
        every base parameter's ``requires_grad`` as it was.
    """
    reference = next(model.parameters())
    encoder = PrefixEncoder(model.config, **encoder_kwargs).to(device=reference.device, dtype=reference.dtype)
    frozen = {name: parameter.requires_grad for name, parameter in model.named_parameters()}

    def restore() -> None:
        for name, parameter in model.named_parameters():
            if name in frozen:
                parameter.requires_grad_(frozen[name])

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    attach(model, encoder, _on_detach=restore)
    from .trainer import prepare_for_training

    prepare_for_training(model)  # Hugging Face Trainer: resume with the prefix, correct loss scaling (docs/training.md)
    return encoder


def trainable_parameters(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts of ``model`` (attached prefix included).

    Returns:
        ``{"trainable": int, "total": int, "percent": float}``.
    """
    parameters = list(model.parameters())  # shared (tied) weights are listed once
    total = sum(parameter.numel() for parameter in parameters)
    trainable = sum(parameter.numel() for parameter in parameters if parameter.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}
