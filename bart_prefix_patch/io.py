"""The on-disk prefix format: safetensors weights plus a JSON config, never pickle.

This module is the one owner of that format. :func:`save_prefix` writes it;
:func:`read_prefix` reads and validates a prefix directory and is what
:func:`load_prefix`, :func:`bart_prefix_patch.trainer.restore_prefix` and the
command line use, so every failure names the file and what is wrong with it
(missing, truncated, not safetensors, a pickle, bad JSON, config and weights
that disagree, dimensions of another model) as one :class:`PrefixError`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load, save_file

from ._attach import attached
from ._models import DIM_KEYS
from ._version import __version__
from .encoder import PrefixEncoder
from .errors import PrefixError
from ._constants import SITES

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix_model.safetensors"
RUN_INFO = "prefix_training.json"  # written by the ``train`` command beside the prefix; optional
FORMAT_VERSION = 1
# Fields of RUN_INFO that ``generate`` reads back, and their types (None allowed for each).
_ENCODER_KEYS = ("prefix_length", "sites", "hidden_size", "dropout")  # PrefixEncoder arguments in the config
RUN_INFO_FIELDS = {
    "model": str, "source_field": str, "target_field": str, "max_source_length": int, "max_target_length": int
}


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
        for key in DIM_KEYS:
            setattr(self, key, config[key])


@dataclass
class SavedPrefix:
    """A validated prefix directory, as :func:`read_prefix` returns it.

    Attributes:
        directory: The directory.
        config: The parsed ``prefix_config.json``.
        tensors: The weights (CPU tensors), names and shapes checked against ``config``.
        run_info: The parsed ``prefix_training.json`` of a ``train`` run, or None when absent.
    """

    directory: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    run_info: Optional[dict]

    def encoder_kwargs(self) -> dict:
        """The :class:`PrefixEncoder` arguments the config records (besides the model config)."""
        return {key: self.config[key] for key in _ENCODER_KEYS}


def read_prefix(path: Union[str, Path], model_config: Any = None) -> SavedPrefix:
    """Read and validate a prefix directory written by :func:`save_prefix`.

    Nothing is built or changed: on any problem this raises before a caller
    touches a model or an encoder.

    Args:
        path: The directory.
        model_config: Optional config of the model the prefix is for; its
            dimensions (:data:`DIM_KEYS`) must equal the saved ones.

    Returns:
        The validated :class:`SavedPrefix`.

    Raises:
        PrefixError: Naming the file and the problem: missing, not UTF-8 or
            not valid JSON, fields missing or of the wrong type, an unknown
            format, weights that are truncated, a pickle or otherwise not
            safetensors, weights whose names or shapes disagree with the
            config, non-finite weights, or dimensions of another model.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise PrefixError(f"{directory}: {'not a directory' if directory.exists() else 'directory not found'}")
    config_path, weights_path, info_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME, directory / RUN_INFO
    for required in (config_path, weights_path):
        if not required.is_file():
            raise PrefixError(f"{directory}: no {required.name} (expected a folder written by save_prefix or `train`)")
    config = _read_json(config_path)
    _check_config(config_path, config)
    if model_config is not None:
        expected = {key: getattr(model_config, key, None) for key in DIM_KEYS}
        mismatched = {key: (expected[key], config[key]) for key in DIM_KEYS if config[key] != expected[key]}
        if mismatched:
            details = ", ".join(f"{key}: model {m}, prefix {p}" for key, (m, p) in mismatched.items())
            raise PrefixError(f"{config_path}: the prefix was saved for another model shape ({details})")
    tensors = _read_weights(weights_path)
    _check_weights(weights_path, tensors, config)
    run_info = None
    if info_path.exists():
        run_info = _read_json(info_path)
        for key, kind in RUN_INFO_FIELDS.items():
            value = run_info.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise PrefixError(
                    f"{info_path}: field {key!r} must be {kind.__name__} or null, got {type(value).__name__}"
                )
    return SavedPrefix(directory, config, tensors, run_info)


def _read_json(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise PrefixError(f"{path}: not UTF-8 text (byte {error.start}): expected a JSON object") from None
    except OSError as error:
        raise PrefixError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PrefixError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    if not isinstance(value, dict):
        raise PrefixError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_config(path: Path, config: dict) -> None:
    if config.get("format") != FORMAT_VERSION:
        raise PrefixError(f"{path}: expected format {FORMAT_VERSION}, got {config.get('format')!r}")
    required = ("prefix_length", "sites", "hidden_size", "dropout", *DIM_KEYS)
    missing = [key for key in required if key not in config]
    if missing:
        raise PrefixError(f"{path}: missing field(s) {', '.join(missing)}")
    for key in DIM_KEYS:
        if not _positive_int(config[key]):
            raise PrefixError(f"{path}: {key} must be a positive integer, got {config[key]!r}")
    for heads in ("encoder_attention_heads", "decoder_attention_heads"):
        if config["d_model"] % config[heads]:
            raise PrefixError(f"{path}: d_model {config['d_model']} is not divisible by {heads} {config[heads]}")
    sites = config["sites"]
    if not isinstance(sites, list) or not sites or any(s not in SITES for s in sites) or len(set(sites)) < len(sites):
        raise PrefixError(f"{path}: sites must be a non-empty list of distinct names from {list(SITES)}, got {sites!r}")
    lengths = config["prefix_length"]
    per_site = lengths if isinstance(lengths, dict) else {site: lengths for site in sites}
    if any(not _positive_int(per_site.get(site)) for site in sites):
        raise PrefixError(f"{path}: prefix_length must be a positive integer per site {sites}, got {lengths!r}")
    hidden = config["hidden_size"]
    if hidden is not None and not _positive_int(hidden):
        raise PrefixError(f"{path}: hidden_size must be a positive integer or null, got {hidden!r}")
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PrefixError(f"{path}: dropout must be a number in [0, 1), got {dropout!r}")


# First bytes of what torch.save / pickle write: a zip archive (torch >= 1.6) or a pickle protocol 2+ stream.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PrefixError(f"{path}: cannot read ({error.strerror or error})") from None
    if data.startswith(_PICKLE_MAGIC):
        raise PrefixError(
            f"{path}: a pickle (torch.save) file, not safetensors; refused, because loading a pickle runs code "
            "(re-save the prefix with bpp.save_prefix)"
        )
    # safetensors: an 8-byte little-endian header length, the JSON header, then the data.
    if len(data) < 8:
        raise PrefixError(
            f"{path}: truncated ({len(data)} bytes; a safetensors file starts with an 8-byte header size)"
        )
    (header,) = struct.unpack("<Q", data[:8])
    if header > len(data) - 8:
        raise PrefixError(
            f"{path}: truncated or not safetensors (the header claims {header} bytes, the file has {len(data) - 8} "
            "after the size field)"
        )
    try:
        return load(data)
    except Exception as error:  # safetensors raises SafetensorError (and others) with a terse message
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PrefixError(f"{path}: not a valid safetensors file ({reason})") from None


def _check_weights(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    # The encoder the config describes, on meta: its state_dict gives the expected names and shapes.
    try:
        with torch.device("meta"):
            expected = PrefixEncoder(_Dims(config), **{key: config[key] for key in _ENCODER_KEYS})
    except PrefixError as error:
        raise PrefixError(f"{path.parent / CONFIG_NAME}: {error}") from None
    shapes = {name: tuple(tensor.shape) for name, tensor in expected.state_dict().items()}
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise PrefixError(
            f"{path}: config and weights disagree ({CONFIG_NAME} describes tensors {sorted(shapes)}; "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'})"
        )
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise PrefixError(
                f"{path}: config and weights disagree: {name} has shape {tuple(tensor.shape)}, {CONFIG_NAME} "
                f"implies {shape}"
            )
        if not tensor.is_floating_point():
            raise PrefixError(f"{path}: {name} has dtype {tensor.dtype}, expected a floating-point dtype")
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise PrefixError(f"{path}: {name} holds NaN or infinite values")


def load_prefix(path: Union[str, Path], model: Optional[torch.nn.Module] = None) -> PrefixEncoder:
    """Load a prefix saved by :func:`save_prefix` (returned, not attached).

    Args:
        path: The directory written by :func:`save_prefix`.
        model: Optional model to validate the dimensions against (and whose
            device and dtype the encoder is moved to). It is never modified.

    Returns:
        A new :class:`PrefixEncoder` holding the saved weights.

    Raises:
        PrefixError: Naming the file and the problem (see :func:`read_prefix`).
    """
    saved = read_prefix(path, model.config if model is not None else None)
    encoder = PrefixEncoder(model.config if model is not None else _Dims(saved.config), **saved.encoder_kwargs())
    encoder.load_state_dict(saved.tensors)  # names and shapes checked by read_prefix
    if model is not None:
        reference = next(model.parameters())
        encoder = encoder.to(device=reference.device, dtype=reference.dtype)
    return encoder


def load_into(encoder: PrefixEncoder, path: Union[str, Path]) -> None:
    """Copy a saved prefix into an existing :class:`PrefixEncoder`, in place.

    In place, so an optimizer holding the encoder's parameters keeps working.
    Everything is validated before the first parameter is written, so on an
    error the encoder is unchanged.

    Args:
        encoder: The encoder to update.
        path: The directory written by :func:`save_prefix`.

    Raises:
        PrefixError: Naming the file and the problem (see :func:`read_prefix`),
            or a saved prefix of another shape than ``encoder`` (model
            dimensions, sites, lengths or MLP width; dropout may differ).
    """
    saved = read_prefix(path)
    mine = encoder.config_dict()
    fields = [key for key in mine if key != "dropout"]
    different = {key: (saved.config.get(key), mine[key]) for key in fields if saved.config.get(key) != mine[key]}
    if different:
        details = ", ".join(f"{key}: saved {s!r}, attached {a!r}" for key, (s, a) in different.items())
        raise PrefixError(
            f"{saved.directory / CONFIG_NAME}: the prefix does not fit the attached PrefixEncoder ({details})"
        )
    encoder.load_state_dict(saved.tensors)
