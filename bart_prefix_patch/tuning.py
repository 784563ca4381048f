"""One-call prefix-tuning set-up: build, attach, freeze; parameter accounting."""

from __future__ import annotations

import torch

from ._attach import attach, attachment_of
from ._constants import ATTACHED_NAME
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
    previous = attachment_of(model)
    if previous is not None and previous.requires_grad is not None:
        before = previous.requires_grad  # already frozen by an earlier call: keep the first state
    else:  # the base's own parameters (not those of a prefix module attached earlier)
        before = {n: p.requires_grad for n, p in model.named_parameters() if not n.startswith(ATTACHED_NAME + ".")}
    attach(model, encoder, _requires_grad=before)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(ATTACHED_NAME + "."))
    declare_mean_loss(model)  # Hugging Face Trainer: correct loss scaling (docs/training.md)
    return encoder


def declare_mean_loss(model: torch.nn.Module) -> None:
    """Set ``model.accepts_loss_kwargs = False``: the model's loss is a plain mean.

    BART-family forwards take ``**kwargs`` but compute a plain mean loss,
    ignoring the ``num_items_in_batch`` the Hugging Face Trainer passes; the
    Trainer, which infers support from the ``**kwargs``, then neither divides
    the loss by ``gradient_accumulation_steps`` nor undoes its multiplication
    by the number of processes (``average_tokens_across_devices``): gradients
    come out k times too large under k-step accumulation or k data-parallel
    ranks. Declaring a mean loss makes the Trainer scale it as for any
    mean-loss model, so a data-parallel run matches a single process.
    """
    model.accepts_loss_kwargs = False


def trainable_parameters(model: torch.nn.Module) -> dict:
    """Trainable and total parameter counts of ``model`` (attached prefix included).

    Returns:
        ``{"trainable": int, "total": int, "percent": float}``.
    """
    parameters = list(model.parameters())  # shared (tied) weights are listed once
    total = sum(parameter.numel() for parameter in parameters)
    trainable = sum(parameter.numel() for parameter in parameters if parameter.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}
