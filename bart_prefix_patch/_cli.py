"""``train`` and ``generate`` subcommands: prefix-tune a local BART folder on JSONL, run a saved prefix.

Errors the user can fix (missing files, bad JSON lines, missing fields, a folder
that is not a BART checkpoint) raise :class:`CLIError`; ``__main__`` prints its
one-line message and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

from ._architectures import ARCHITECTURES
from ._constants import SITES
from .io import CONFIG_NAME, RUN_INFO, WEIGHTS_NAME


class CLIError(Exception):
    """A problem with the command line or its input files: one line, exit code 2."""


# ------------------------------------------------------------------ input


def read_jsonl(path: str, fields: tuple[str, ...], option: str) -> list[dict]:
    """The records of a JSONL file; every one must be an object with string ``fields``."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{option} {path}: file not found")
    records = []
    try:
        data = file.read_bytes()
    except OSError as error:
        raise CLIError(f"{option} {path}: cannot read ({error.strerror or error})") from None
    # Decoded line by line, so that a byte that is not UTF-8 is reported with its line.
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise CLIError(
                f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CLIError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise CLIError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        for field in fields:
            if field not in record:
                available = ", ".join(repr(k) for k in record) or "none"
                raise CLIError(f"{path}:{number}: missing field {field!r} (fields: {available})")
            if not isinstance(record[field], str):
                raise CLIError(
                    f"{path}:{number}: field {field!r} must be a string, got {type(record[field]).__name__}"
                )
        records.append(record)
    if not records:
        raise CLIError(f"{path}: no examples (empty file)")
    return records


def load_model_and_tokenizer(directory: str, device: str):
    """A BART model and its tokenizer from a folder written by ``save_pretrained`` (never downloads)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CLIError(f"--model {directory}: directory not found")
    if not (folder / "config.json").is_file():
        raise CLIError(f"--model {directory}: no config.json (expected a folder written by save_pretrained)")
    import transformers
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        raise CLIError(
            f"--model {directory}: model_type {getattr(config, 'model_type', None)!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    weights = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise CLIError(f"--model {directory}: no model weights ({', '.join(_WEIGHT_FILES)})")
    hint = "save one there with tokenizer.save_pretrained()"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CLIError(f"--model {directory}: no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...): {hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError or TypeError here
        raise CLIError(f"--model {directory}: no usable tokenizer ({_first_line(error)}): {hint}") from None
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # no load report or bar for the folder we were pointed at
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise CLIError(f"--model {directory}: cannot load the model ({_first_line(error)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    return model.to(device), tokenizer


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "vocab.txt")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _fit_lengths(args, model) -> None:
    """Source, target and generated lengths within the model's learned positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for name in ("max_source_length", "max_target_length"):
        if getattr(args, name, None):
            setattr(args, name, min(getattr(args, name), limit))
    args.max_new_tokens = min(args.max_new_tokens, limit - 1)


def _device(requested: Optional[str]) -> str:
    """The torch device to run on; a name torch does not know, or cannot use here, is a CLIError."""
    import torch

    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"--device {requested}: not a torch device (expected e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "meta":
        raise CLIError(f"--device {requested}: the meta device holds no data; expected e.g. cpu or cuda")
    if device.type != "cpu":
        try:  # the one reliable test across device types (CUDA, MPS, XPU, ...) and torch builds
            torch.empty(1, device=device)
        except Exception as error:  # AssertionError (no CUDA build), RuntimeError (no device), ...
            raise CLIError(f"--device {requested}: not usable here ({_first_line(error)}); try --device cpu") from None
    return str(device)


def _check_numbers(args, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()) -> None:
    """Integer options that must be >= 1 (or >= 0), checked before any file is read."""
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    for name in non_negative:
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise CLIError(f"--{name.replace('_', '-')} {value}: expected 0 or a positive integer")


def _sites(text: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise CLIError(f"--sites {text}: expected a comma-separated subset of {','.join(SITES)}")
    return sites


# ------------------------------------------------------------- batching


def _encode(tokenizer, sources: list[str], targets: Optional[list[str]], args) -> dict:
    batch = tokenizer(sources, max_length=args.max_source_length, truncation=True, padding=True, return_tensors="pt")
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if targets is not None:
        labels = tokenizer(text_target=targets, max_length=args.max_target_length, truncation=True, padding=True,
                           return_tensors="pt")["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        out["labels"] = labels
    return out


def _batches(records: list[dict], size: int, shuffle: Optional[random.Random] = None):
    order = list(range(len(records)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for start in range(0, len(order), size):
        yield [records[i] for i in order[start : start + size]]


def _progress(total: int, description: str, disable: bool = False):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=disable)
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _predict(
    model, tokenizer, sources: list[str], args, description: str = "generating", bank=None, tasks=None
) -> list[str]:
    """Generate for ``sources``; with a ``bank``, ``tasks[i]`` names source i's prefix (None: no prefix)."""
    import torch

    predictions = []
    bar = _progress(len(sources), description, disable=len(sources) <= args.batch_size)
    model.eval()
    for start in range(0, len(sources), args.batch_size):
        chunk = sources[start : start + args.batch_size]
        batch = {k: v.to(model.device) for k, v in _encode(tokenizer, chunk, None, args).items()}
        if bank is not None:  # rows of several tasks in one batch (PrefixBank.select -> Prefix.stack)
            batch["prefix"] = bank.select(tasks[start : start + args.batch_size])
        with torch.no_grad():
            out = model.generate(**batch, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        predictions += [_normalise(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return predictions


def _evaluate(model, tokenizer, records: list[dict], args) -> dict:
    import torch

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in _batches(records, args.batch_size):
            batch = _encode(tokenizer, [r[args.source_field] for r in chunk], [r[args.target_field] for r in chunk], args)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            count = int((batch["labels"] != -100).sum())
            total += model(**batch).loss.item() * count
            tokens += count
    predictions = _predict(model, tokenizer, [r[args.source_field] for r in records], args, "evaluating")
    exact = sum(p == _normalise(r[args.target_field]) for p, r in zip(predictions, records)) / len(records)
    return {"eval_loss": total / max(tokens, 1), "exact_match": exact, "example": predictions[0]}


# ----------------------------------------------------------------- train


def train(args) -> int:
    import torch

    import bart_prefix_patch as bpp

    _check_numbers(
        args,
        ("epochs", "batch_size", "prefix_length", "max_source_length", "max_target_length", "max_new_tokens",
         "num_beams"),
        ("hidden_size", "eval_every"),
    )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"--lr {args.lr}: expected a positive learning rate")
    if not 0 <= args.dropout < 1:
        raise CLIError(f"--dropout {args.dropout}: expected a probability in [0, 1)")
    sites = _sites(args.sites)
    fields = (args.source_field, args.target_field)
    train_records = read_jsonl(args.train, fields, "--train")
    eval_records = read_jsonl(args.eval, fields, "--eval") if args.eval else None
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {args.output}: exists and is not a directory")
    try:  # now, not after training: an unwritable place fails before the work
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"--output {args.output}: cannot create the directory ({error.strerror or error})") from None
    device = _device(args.device)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, device)
    _fit_lengths(args, model)
    try:
        encoder = bpp.add_prefix_tuning(
            model, prefix_length=args.prefix_length, sites=sites,
            hidden_size=args.hidden_size or None, dropout=args.dropout,
        )
    except bpp.BartPrefixPatchError as error:
        raise CLIError(f"--model {args.model}: {error}") from None
    counts = bpp.trainable_parameters(model)
    steps_per_epoch = math.ceil(len(train_records) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    print(f"model {args.model}: {type(model).__name__}, {counts['total'] - counts['trainable']:,} frozen parameters")
    print(f"prefix: length {args.prefix_length} at {','.join(sites)}, "
          f"{'flat' if not args.hidden_size else f'MLP width {args.hidden_size}'}: "
          f"{counts['trainable']:,} trainable parameters ({counts['percent']:.2f}%)")
    print(f"data: {len(train_records)} training examples"
          + (f", {len(eval_records)} eval examples" if eval_records else "")
          + f"; {args.epochs} epochs x {steps_per_epoch} steps of batch {args.batch_size} on {device}")

    optimizer = torch.optim.AdamW(encoder.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    shuffle = random.Random(args.seed)
    history, evaluations, step = [], [], 0
    eval_every = args.eval_every if args.eval_every > 0 else steps_per_epoch
    started = time.perf_counter()

    def run_eval(epoch):
        metrics = {"step": step, "epoch": epoch, **_evaluate(model, tokenizer, eval_records, args)}
        evaluations.append(metrics)
        print(f"eval @ step {step}: loss {metrics['eval_loss']:.4f}, exact match {100 * metrics['exact_match']:.1f}%, "
              f"first prediction {metrics['example']!r}", flush=True)
        model.train()

    if eval_records:
        run_eval(0)
    for epoch in range(1, args.epochs + 1):
        model.train()
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{args.epochs}")
        for chunk in _batches(train_records, args.batch_size, shuffle):
            batch = _encode(tokenizer, [r[args.source_field] for r in chunk], [r[args.target_field] for r in chunk], args)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            history.append({"step": step, "loss": loss.item()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss.item():.4f}")
            elif step % max(1, steps_per_epoch // 5) == 0:  # pragma: no cover - no tqdm
                print(f"epoch {epoch} step {step}/{total_steps}: loss {loss.item():.4f}", flush=True)
            if eval_records and step % eval_every == 0:
                if bar is not None:
                    bar.clear()
                run_eval(epoch)
        if bar is not None:
            bar.close()
        recent = [h["loss"] for h in history[-steps_per_epoch:]]
        print(f"epoch {epoch}: mean training loss {sum(recent) / len(recent):.4f}", flush=True)
    if eval_records and (not evaluations or evaluations[-1]["step"] != step):
        run_eval(args.epochs)

    model.eval()
    bpp.save_prefix(encoder, output)
    info = {
        "model": str(Path(args.model).resolve()),
        "train": str(Path(args.train).resolve()),
        "eval": str(Path(args.eval).resolve()) if args.eval else None,
        "source_field": args.source_field,
        "target_field": args.target_field,
        "max_source_length": args.max_source_length,
        "max_target_length": args.max_target_length,
        "steps": step,
        "seconds": round(time.perf_counter() - started, 2),
        "loss_history": history,
        "evaluations": evaluations,
    }
    (output / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-steps_per_epoch:]) / min(steps_per_epoch, len(history))
    print(f"trained {step} steps in {info['seconds']:.1f} s: training loss {first:.4f} -> {last:.4f}")
    if evaluations:
        print(f"eval exact match {100 * evaluations[0]['exact_match']:.1f}% -> {100 * evaluations[-1]['exact_match']:.1f}%")
    print(f"prefix saved to {output} ({CONFIG_NAME}, {WEIGHTS_NAME}, {RUN_INFO})")
    return 0


# -------------------------------------------------------------- generate


def generate(args) -> int:
    import bart_prefix_patch as bpp
    from .io import read_prefix

    _check_numbers(args, ("batch_size", "num_beams", "max_new_tokens", "max_source_length"))
    if bool(args.input) == bool(args.text):
        raise CLIError("give either --input FILE.jsonl or --text TEXT (one or more)")
    if args.output:
        target = Path(args.output)
        if target.is_dir():
            raise CLIError(f"--output {args.output}: is a directory (expected a file path)")
        if not target.parent.is_dir():
            raise CLIError(f"--output {args.output}: directory {target.parent} not found")
    device = _device(args.device)
    named = _named_prefixes(args.prefix)
    saved_all = {}
    for name, folder in named.items():
        try:  # every file of every prefix folder validated before the model is loaded (bart_prefix_patch.io)
            saved_all[name] = read_prefix(folder)
        except bpp.PrefixError as error:
            raise CLIError(f"--prefix {folder if name is None else f'{name}={folder}'}: {error}") from None
    saved = next(iter(saved_all.values()))
    first = args.prefix[0]
    info = saved.run_info or {}
    model_dir = args.model or info.get("model")
    if not model_dir:
        raise CLIError(f"--model is required: {first} does not record the model it was trained on")
    args.max_source_length = args.max_source_length or info.get("max_source_length") or 1024
    source_field = args.source_field or info.get("source_field") or "src"
    records = read_jsonl(args.input, (source_field,), "--input") if args.input else None
    tasks = _tasks(named, records, args) if None not in named else None

    model, tokenizer = load_model_and_tokenizer(model_dir, device)
    _fit_lengths(args, model)
    bank = None
    try:
        if tasks is None:
            bpp.attach(model, bpp.load_prefix(saved.directory, model=model))
        else:
            bank = bpp.PrefixBank.from_prefix_dirs({name: s.directory for name, s in saved_all.items()}, model=model)
    except bpp.BartPrefixPatchError as error:
        raise CLIError(f"--prefix {' '.join(args.prefix)}: {error}") from None
    sources = [r[source_field] for r in records] if records is not None else list(args.text)
    predictions = _predict(model, tokenizer, sources, args, bank=bank, tasks=tasks)
    if records is None:
        lines = predictions
    else:
        lines = [json.dumps({**record, "prediction": p}, ensure_ascii=False) for record, p in zip(records, predictions)]
    if args.output:
        try:
            Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
        except OSError as error:
            raise CLIError(f"--output {args.output}: cannot write ({error.strerror or error})") from None
        print(f"{len(lines)} predictions written to {args.output}", file=sys.stderr)
    else:
        for line in lines:
            print(line)
    return 0


def _named_prefixes(values: list[str]) -> dict:
    """``--prefix DIR`` (one, unnamed: key None) or ``--prefix NAME=DIR ...`` (name -> folder, in order)."""
    named = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or "/" in name or "\\" in name or "." in name or not folder:
            if Path(value).exists() or not sep:
                name, folder = None, value
            else:
                raise CLIError(f"--prefix {value}: expected NAME=DIR (a name without '.' or '/') or DIR")
        if name in named:
            raise CLIError(f"--prefix {value}: {'more than one unnamed --prefix' if name is None else f'name {name!r} given twice'}")
        named[name] = folder
    if None in named and len(named) > 1:
        raise CLIError("--prefix: give one folder, or name every prefix (NAME=DIR) to serve several tasks")
    return named


def _tasks(named: dict, records: Optional[list[dict]], args) -> list:
    """Each input's task: its ``"task"`` field (null: no prefix), else the first --prefix name."""
    default = next(iter(named))
    if records is None:
        return [default] * len(args.text)
    tasks = []
    for number, record in enumerate(records, 1):
        task = record.get("task", default)
        if task is not None and (not isinstance(task, str) or task not in named):
            raise CLIError(
                f"--input {args.input}: example {number}: task {task!r} is not a --prefix name (expected one of "
                f"{', '.join(named)}, or null for no prefix)"
            )
        tasks.append(task)
    return tasks


# ---------------------------------------------------------------- parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or action.nargs == 0 or "default" in text:
            return text  # positionals, required options and flags have no default worth printing
        if action.default is None or action.default == argparse.SUPPRESS:
            return f"{text} (default: none)".lstrip()
        return f"{text} (default: %(default)s)".lstrip()


def add_commands(commands) -> None:
    """Register ``demo``, ``train`` and ``generate`` on an argparse subparsers object."""
    commands = _WithDefaults(commands)
    demo = commands.add_parser(
        "demo", help="build, pretrain, freeze and prefix-tune a small BART; compare with stock transformers",
        description="Builds a small BART, pretrains it on tagged tasks, freezes it, prefix-tunes it on a new "
        "untagged task, and runs the same prefix-tuning with stock transformers. No downloads.",
    )
    demo.add_argument("--quick", action="store_true", help="a ~30 s smoke version")
    demo.add_argument("--seed", type=int, default=0, help="random seed")

    train_parser = commands.add_parser(
        "train", help="prefix-tune a local BART folder on a JSONL file",
        description="Prefix-tunes a BART checkpoint folder (save_pretrained, with its tokenizer) on JSONL "
        "records; writes the prefix (save_prefix format) to --output.",
    )
    train_parser.add_argument("--model", required=True, help="folder with config.json, weights and tokenizer")
    train_parser.add_argument("--train", required=True, help="training JSONL file")
    train_parser.add_argument("--eval", help="evaluation JSONL file (loss and exact match)")
    train_parser.add_argument("--source-field", default="src", help="JSON field of the input text (default: src)")
    train_parser.add_argument("--target-field", default="tgt", help="JSON field of the target text (default: tgt)")
    train_parser.add_argument("--output", required=True, help="output folder for the prefix")
    train_parser.add_argument("--prefix-length", type=int, default=20, help="prefix length (positions) at each site")
    train_parser.add_argument("--hidden-size", type=int, default=512, help="prefix MLP width; 0 for a flat prefix")
    train_parser.add_argument("--sites", default=",".join(SITES), help="comma-separated subset of encoder,decoder,cross")
    train_parser.add_argument("--dropout", type=float, default=0.0, help="dropout on the prefix keys/values")
    train_parser.add_argument("--epochs", type=int, default=3, help="passes over the training file")
    train_parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    train_parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (linear decay to 0)")
    train_parser.add_argument("--max-source-length", type=int, default=256, help="source tokens kept (longer are cut)")
    train_parser.add_argument("--max-target-length", type=int, default=128, help="target tokens kept (longer are cut)")
    train_parser.add_argument("--max-new-tokens", type=int, default=128, help="for evaluation generate()")
    train_parser.add_argument("--num-beams", type=int, default=1, help="for evaluation generate()")
    train_parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: each epoch)")
    train_parser.add_argument("--seed", type=int, default=0, help="random seed (initialisation, data order)")
    train_parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")

    gen = commands.add_parser(
        "generate", help="run a saved prefix on new inputs",
        description="Loads the base model and a prefix written by `train` (or save_prefix) and generates.",
    )
    gen.add_argument(
        "--prefix", required=True, action="append",
        help="folder written by `train` or save_prefix; or NAME=DIR, repeated, to serve several tasks: each "
        "--input line's \"task\" field names its prefix (default: the first; null: none), and rows of "
        "different tasks share batches",
    )
    gen.add_argument("--model", help="base model folder (default: the one recorded by `train`)")
    gen.add_argument("--input", help="JSONL file of inputs")
    gen.add_argument("--text", action="append", help="an input text (repeatable)")
    gen.add_argument("--source-field", help="JSON field of the input text (default: as trained, else src)")
    gen.add_argument("--output", help="write predictions here (JSONL with --input) instead of stdout")
    gen.add_argument("--batch-size", type=int, default=16, help="inputs per generate() call")
    gen.add_argument("--num-beams", type=int, default=4, help="beam search width (1: greedy)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per input")
    gen.add_argument("--max-source-length", type=int, help="source tokens kept (default: as trained, else 1024)")
    gen.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


class _WithDefaults:
    """A subparsers object whose ``add_parser`` uses :class:`DefaultsHelpFormatter`."""

    def __init__(self, commands):
        self.commands = commands

    def add_parser(self, name: str, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        return self.commands.add_parser(name, **kwargs)


def run(args) -> int:
    """Dispatch a parsed ``demo`` / ``train`` / ``generate`` command."""
    if args.command == "demo":
        from ._demo import run as run_demo

        return run_demo(quick=args.quick, seed=args.seed)
    if args.command == "train":
        return train(args)
    return generate(args)
