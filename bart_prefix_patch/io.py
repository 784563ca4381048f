"""Saving and loading prefixes: safetensors weights plus a JSON config, never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from ._attach import attached
from ._models import DIM_KEYS as _DIM_KEYS
from ._version import __version__
from .encoder import PrefixEncoder
from .errors import PrefixError

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix_model.safetensors"
FORMAT_VERSION = 1


def _encoder_of(encoder_or_model: torch.nn.Module) -> PrefixEncoder:
    if isinstance(encoder_or_model, PrefixEncoder):
        return encoder_or_model
    source = attached(encoder_or_model)
    if not isinstance(source, PrefixEncoder):
        raise PrefixError(
            "save_prefix: expected a PrefixEncoder or a model with one attached (bpp.add_prefix_tuning), "
            f"got {type(encoder_or_model).__name__} with {type(source).__name__ if source is not None else 'nothing'} attached"
        )
    return source


def save_prefix(encoder_or_model: torch.nn.Module, path: Union[str, Path]) -> Path:
    """Write ``prefix_config.json`` and ``prefix_model.safetensors`` into directory ``path``.

    Args:
        encoder_or_model: A :class:`PrefixEncoder`, or a model it is attached to.
        path: Output directory (created if missing).

    Returns:
        The directory.
    """
    encoder = _encoder_of(encoder_or_model)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT_VERSION, "bart_prefix_patch_version": __version__, **encoder.config_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in encoder.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


class _Dims:
    """A config-like object carrying only the dimensions a PrefixEncoder needs."""

    def __init__(self, config: dict):
        for key in _DIM_KEYS:
            setattr(self, key, config[key])


def load_prefix(path: Union[str, Path], model: Optional[torch.nn.Module] = None) -> PrefixEncoder:
    """Load a prefix saved by :func:`save_prefix` (returned, not attached).

    Args:
        path: The directory written by :func:`save_prefix`.
        model: Optional model to validate the dimensions against (and whose
            device and dtype the encoder is moved to).

    Raises:
        PrefixError: Missing files, an unknown format, or dimensions that do
            not match ``model``.
    """
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.exists():
            raise PrefixError(f"load_prefix: expected {required.name} in {directory}, not found")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT_VERSION:
        raise PrefixError(f"load_prefix: expected format {FORMAT_VERSION}, got {config.get('format')!r}")
    if model is not None:
        expected = {key: getattr(model.config, key) for key in _DIM_KEYS}
        mismatched = {k: (expected[k], config.get(k)) for k in _DIM_KEYS if config.get(k) != expected[k]}
        if mismatched:
            details = ", ".join(f"{k}: model {m}, prefix {p}" for k, (m, p) in mismatched.items())
            raise PrefixError(f"load_prefix: the prefix was saved for another model shape ({details})")
    encoder = PrefixEncoder(
        model.config if model is not None else _Dims(config),
        prefix_length=config["prefix_length"],
        sites=config["sites"],
        hidden_size=config["hidden_size"],
        dropout=config["dropout"],
    )
    encoder.load_state_dict(load_file(str(weights_path)))
    if model is not None:
        reference = next(model.parameters())
        encoder = encoder.to(device=reference.device, dtype=reference.dtype)
    return encoder
