"""Training integration: save_pretrained, Seq2SeqTrainer (resume, best model, predict_with_generate),
gradient checkpointing, bf16 autocast on CPU.

Where the prefix lives: a submodule for training, next to (never inside) the weights on disk
(docs/training.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings

import pytest
import torch
from reference import tiny_model
from safetensors.torch import load_file

import bart_prefix_patch as bpp
from bart_prefix_patch.trainer import load_prefix_tuned

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from transformers import BartForConditionalGeneration, Seq2SeqTrainer, Seq2SeqTrainingArguments  # noqa: E402


def _examples(count=16, seed=0, source_length=6):
    """Fixed-length synthetic pairs: two fixed tokens, the first two source tokens, EOS."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        source = torch.randint(3, 64, (source_length,), generator=generator)
        labels = torch.cat([torch.tensor([10, 11]), source[:2], torch.tensor([2])])
        rows.append({"input_ids": source, "attention_mask": torch.ones_like(source), "labels": labels})
    return rows


def _prefixed_model(seed=0, init_seed=1, **kwargs):
    model = tiny_model(seed=seed, attn_implementation="sdpa")
    torch.manual_seed(init_seed)
    bpp.add_prefix_tuning(model, prefix_length=3, hidden_size=16, **kwargs)
    return model


def _prefix_state(model):
    return {name: tensor.detach().clone() for name, tensor in bpp.attached(model).state_dict().items()}


def _assert_same_state(got, want, exact=True):
    assert got.keys() == want.keys()
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def _trainer(model, output_dir, max_steps, eval_dataset=None, **overrides):
    arguments = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        predict_with_generate=True,
        generation_max_length=8,
        generation_num_beams=1,
    )
    arguments.update(overrides)
    return Seq2SeqTrainer(
        model=model, args=Seq2SeqTrainingArguments(**arguments), train_dataset=_examples(), eval_dataset=eval_dataset
    )


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ------------------------------------------------------------- save_pretrained


def test_save_pretrained_writes_a_plain_base_model_and_the_prefix_beside_it(tmp_path):
    model = _prefixed_model()
    with torch.no_grad():
        for parameter in bpp.attached(model).parameters():
            parameter.normal_(0, 0.5)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with_prefix = model.generate(ids, max_new_tokens=6, num_beams=2)
    model.save_pretrained(tmp_path)

    weights = load_file(str(tmp_path / "model.safetensors"))
    assert not [key for key in weights if "bpp" in key]
    assert (tmp_path / "prefix_config.json").is_file() and (tmp_path / "prefix_model.safetensors").is_file()
    assert bpp.attached(model) is not None and any(n.startswith("bpp_prefix.") for n, _ in model.named_parameters())
    assert "bpp_prefix.prefixes.cross.mlp.0.weight" in model.state_dict(), "state_dict() keeps the prefix"
    assert not model.__dict__.get("_keys_to_ignore_on_save"), "the exclusion is for the duration of the save only"

    bpp.revert()  # unmodified transformers
    try:
        plain, info = BartForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"], info
        stock = plain.eval()(ids, decoder_input_ids=ids[:, :4]).logits
    finally:
        bpp.apply(strict=True)
    base = tiny_model(seed=0, attn_implementation="sdpa")
    torch.testing.assert_close(stock, base(ids, decoder_input_ids=ids[:, :4]).logits)

    reloaded = load_prefix_tuned(tmp_path)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=6, num_beams=2), with_prefix)


# ---------------------------------------------------------- Seq2SeqTrainer


def test_seq2seq_trainer_trains_the_prefix_only_and_predicts_with_generate(tmp_path):
    model = _prefixed_model()
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("bpp_prefix.")}
    trainer = _trainer(model, tmp_path, max_steps=12)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in bpp.attached(model).parameters()}
    losses = _losses(trainer)
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    for name, parameter in model.named_parameters():
        if name in base:
            assert torch.equal(parameter, base[name]), f"frozen {name} moved"

    test = _examples(count=6, seed=5)
    predictions = trainer.predict(test).predictions
    ids = torch.stack([row["input_ids"] for row in test])
    model.eval()
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_length=8, num_beams=1)
    got = torch.as_tensor(predictions)
    got = torch.where(got == -100, torch.tensor(model.config.pad_token_id), got)[:, : expected.shape[1]]
    assert torch.equal(got, expected)
    # The prediction really depends on the input (the bug this package fixes would make every row equal).
    assert len({tuple(row) for row in expected.tolist()}) > 1


def test_trainer_checkpoint_resumes_with_the_prefix(tmp_path, recwarn):
    straight = _prefixed_model()
    trainer = _trainer(straight, tmp_path / "a", max_steps=8, save_strategy="steps", save_steps=4)
    trainer.train()
    final = _prefix_state(straight)
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "prefix_model.safetensors").is_file()
    assert not [key for key in load_file(str(checkpoint / "model.safetensors")) if "bpp" in key]
    saved = {k.removeprefix("bpp_prefix."): v for k, v in load_file(str(tmp_path / "a" / "checkpoint-8" / "prefix_model.safetensors")).items()}
    _assert_same_state(saved, final)

    at_checkpoint = {k.removeprefix("bpp_prefix."): v for k, v in load_file(str(checkpoint / "prefix_model.safetensors")).items()}

    # A fresh process would build the model the same way, but its prefix starts elsewhere (init_seed).
    restored = _prefixed_model(init_seed=7)
    assert not torch.equal(_prefix_state(restored)["prefixes.cross.embedding.weight"], at_checkpoint["prefixes.cross.embedding.weight"])
    _resume(_trainer(restored, tmp_path / "b", max_steps=4), checkpoint)  # nothing left to do
    _assert_same_state(_prefix_state(restored), at_checkpoint)  # restored exactly
    assert not [w for w in recwarn.list if "no saved prefix" in str(w.message)]

    # Resuming and training on reproduces the uninterrupted run (optimizer, scheduler, data order and prefix).
    resumed = _prefixed_model(init_seed=7)
    if not _resume(_trainer(resumed, tmp_path / "c", max_steps=8), checkpoint):
        pytest.skip(f"the stock Trainer of transformers {transformers.__version__} cannot read its rng_state.pth "
                    f"under torch {torch.__version__} (torch.load weights_only); the prefix itself was restored")
    _assert_same_state(_prefix_state(resumed), final, exact=False)


def _resume(trainer, checkpoint) -> bool:
    """trainer.train(resume_from_checkpoint=...); False where the stock Trainer cannot load its RNG state."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    except pickle.UnpicklingError:  # transformers < 4.5x with torch >= 2.6: weights_only torch.load
        return False
    return True


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _captured_logs():
    """Log records of transformers and of this package (INFO and up), and every Python warning.

    transformers' loggers do not propagate to the root logger (pytest's caplog sees nothing), so a
    handler goes on each library's root logger directly.
    """
    handler = _Records()
    loggers = [logging.getLogger("transformers"), logging.getLogger("bart_prefix_patch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.records, caught
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _assert_prefix_keys_not_reported(records, caught):
    reports = [r.getMessage() for r in records if r.levelno >= logging.WARNING] + [str(w.message) for w in caught]
    assert not [m for m in reports if "bpp_prefix" in m], "the prefix keys are restored, not missing"


def test_resume_reports_no_missing_prefix_keys_and_says_where_the_prefix_came_from(tmp_path):
    _trainer(_prefixed_model(), tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=4).train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    restored = _prefixed_model(init_seed=7)
    trainer = _trainer(restored, tmp_path / "b", max_steps=4)  # nothing left to train: the prefix stays as loaded
    with _captured_logs() as (records, caught):
        _resume(trainer, checkpoint)
    _assert_prefix_keys_not_reported(records, caught)
    # Stock's own check still runs on everything else (it would report a base weight that is really missing).
    assert any("Loading model from" in r.getMessage() for r in records), "transformers' logs were captured"
    lines = [r for r in records if r.name == "bart_prefix_patch.trainer" and "restored the attached prefix" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert str(checkpoint / "prefix_model.safetensors") in lines[0].getMessage()
    assert "_issue_warnings_after_load" not in trainer.__dict__, "the filter is for the duration of the load only"
    saved = {k.removeprefix("bpp_prefix."): v for k, v in load_file(str(checkpoint / "prefix_model.safetensors")).items()}
    _assert_same_state(_prefix_state(restored), saved)


def test_resume_still_reports_base_weights_that_are_really_missing(tmp_path):
    _trainer(_prefixed_model(), tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    weights = load_file(str(checkpoint / "model.safetensors"))
    from safetensors.torch import save_file

    del weights["model.encoder.layernorm_embedding.weight"]
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with _captured_logs() as (records, caught):
        _resume(_trainer(_prefixed_model(init_seed=7), tmp_path / "b", max_steps=2), checkpoint)
    missing = [r.getMessage() for r in records if r.levelno >= logging.WARNING and "missing keys" in r.getMessage()]
    assert len(missing) == 1 and "model.encoder.layernorm_embedding.weight" in missing[0]
    _assert_prefix_keys_not_reported(records, caught)


def test_load_best_model_at_end_restores_that_checkpoints_prefix(tmp_path):
    model = _prefixed_model()
    trainer = _trainer(
        model, tmp_path, max_steps=4, eval_dataset=_examples(count=4, seed=9), save_strategy="steps", save_steps=2,
        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True,  # the best checkpoint is the worse one: the first
    )
    with _captured_logs() as (records, caught):
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    _assert_prefix_keys_not_reported(records, caught)
    assert [r for r in records if "loading the best model: restored the attached prefix" in r.getMessage()
            and os.path.join(best, "prefix_model.safetensors") in r.getMessage()]
    saved = {k.removeprefix("bpp_prefix."): v for k, v in load_file(os.path.join(best, "prefix_model.safetensors")).items()}
    _assert_same_state(_prefix_state(model), saved)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = _prefixed_model()
    _trainer(plain, tmp_path / "a", max_steps=3).train()
    for reentrant in (True, False):
        checkpointed = _prefixed_model()
        trainer = _trainer(
            checkpointed, tmp_path / f"b{reentrant}", max_steps=3, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )
        trainer.train()
        assert checkpointed.model.encoder.gradient_checkpointing
        _assert_same_state(_prefix_state(checkpointed), _prefix_state(plain), exact=False)


# ------------------------------------------------------------------- bf16


def _loss_and_grads(model, batch):
    bpp.attached(model).zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in bpp.attached(model).named_parameters()}


def test_bf16_autocast_on_cpu_matches_fp32():
    model = _prefixed_model()
    model.train()
    rows = _examples(count=4)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    loss32, grads32 = _loss_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = _loss_and_grads(model, batch)
        model.eval()
        tokens = model.generate(batch["input_ids"], max_new_tokens=5)
    assert tokens.shape[0] == 4
    assert abs(loss16 - loss32) < 0.05 * loss32, (loss16, loss32)
    for name, grad in grads32.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grads16[name].flatten(), dim=0)
        assert cosine > 0.98, (name, cosine)


def test_bf16_trainer_on_cpu(tmp_path):
    model = _prefixed_model()
    before = _prefix_state(model)
    trainer = _trainer(model, tmp_path, max_steps=3, bf16=True)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(loss)) for loss in _losses(trainer))
    assert bpp.attached(model).prefixes["cross"].mlp[0].weight.dtype == torch.float32, "autocast, not a cast"
    assert any(not torch.equal(before[name], value) for name, value in _prefix_state(model).items())
