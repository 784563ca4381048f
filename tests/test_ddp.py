"""Data-parallel prefix-tuning: 2 CPU processes (gloo) end with identical prefixes, equal to one
process over the same global batches.

With the mean token loss on each rank and equal token counts per rank, DDP's averaged gradient is
the gradient of the global batch's mean loss, so the two runs take the same optimizer steps (up to
float summation order).
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import tiny_model

import bart_prefix_patch as bpp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or sys.platform != "linux",
    reason="needs torch.distributed with gloo, and fork",
)

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 8  # 4 per rank


def _model():
    model = tiny_model(seed=0, attn_implementation="sdpa")
    torch.manual_seed(1)
    bpp.add_prefix_tuning(model, prefix_length=3, hidden_size=16)
    return model.train()


def _global_batch(step):
    """Fixed-length rows, no padding: every rank sees the same number of label tokens."""
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 64, (GLOBAL_BATCH, 7), generator=generator)
    labels = torch.cat([torch.full((GLOBAL_BATCH, 1), 10), ids[:, :3], torch.full((GLOBAL_BATCH, 1), 2)], dim=1)
    return ids, labels


def _train(model, forward, shard=slice(None)):
    optimizer = torch.optim.Adam(bpp.attached(model).parameters(), lr=2e-2)
    losses = []
    for step in range(STEPS):
        ids, labels = _global_batch(step)
        loss = forward(input_ids=ids[shard], attention_mask=torch.ones_like(ids[shard]), labels=labels[shard]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in bpp.attached(model).state_dict().items()}


def _init(rank, init_file):
    torch.set_num_threads(1)
    # A timeout, so that a rank left alone in a collective fails instead of hanging the test.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )


def _leave():
    """Both ranks are done: exit without tearing anything down.

    In a forked child, destroying the gloo group while DDP's reducer still holds it (or the
    reducer's destructor afterwards) can deadlock; the results are on disk already.
    """
    dist.barrier()
    os._exit(0)


def _worker(rank, init_file, out_dir, checkpointing):
    _init(rank, init_file)
    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = GLOBAL_BATCH // WORLD
    losses = _train(model, ddp, slice(rank * per_rank, (rank + 1) * per_rank))
    torch.save({"state": _state(model), "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    _leave()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_two_ranks_match_each_other_and_one_process(tmp_path, checkpointing):
    # fork: the children inherit the imported, patched transformers (spawning re-imports it, ~10 s each).
    mp.start_processes(
        _worker, args=(str(tmp_path / "store"), str(tmp_path), checkpointing), nprocs=WORLD, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    single = _model()
    single_losses = _train(single, single)
    want = _state(single)
    initial = _state(_model())
    for name in want:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"ranks differ in {name}"
        torch.testing.assert_close(ranks[0]["state"][name], want[name], atol=1e-5, rtol=1e-4, msg=name)
        assert not torch.equal(want[name], initial[name]), f"{name} did not train"
    # The global batch loss is the mean of the per-rank losses (equal token counts).
    mean = [sum(r["losses"][step] for r in ranks) / WORLD for step in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(single_losses), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------- Seq2SeqTrainer (accelerate)


def _trainer_rows():
    rows = []
    for step in range(STEPS):
        ids, labels = _global_batch(step)
        rows += [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": l} for i, l in zip(ids, labels)]
    return rows


def _run_trainer(output_dir, per_device_batch):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = _model()
    arguments = Seq2SeqTrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=per_device_batch, learning_rate=2e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, ddp_find_unused_parameters=False,
        # In order: global batch k is rows 8k..8k+7 in both runs (rank r takes the r-th half).
        train_sampling_strategy="sequential",
    )
    trainer = Seq2SeqTrainer(model=model, args=arguments, train_dataset=_trainer_rows())
    trainer.train()
    return model, trainer


def _trainer_worker(rank, init_file, out_dir):
    from accelerate.state import AcceleratorState, PartialState

    torch.set_num_threads(1)
    # What torchrun / `accelerate launch` would set; the parent's accelerate singletons are not ours.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    _init(rank, init_file)
    model, trainer = _run_trainer(os.path.join(out_dir, f"out{rank}"), GLOBAL_BATCH // WORLD)
    assert trainer.args.world_size == WORLD and trainer.args.parallel_mode.value == "distributed"
    torch.save({"state": _state(model)}, os.path.join(out_dir, f"trainer{rank}.pt"))
    _leave()


def test_seq2seq_trainer_data_parallel(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        pytest.skip("this transformers has no train_sampling_strategy='sequential'")
    mp.start_processes(_trainer_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [torch.load(tmp_path / f"trainer{rank}.pt") for rank in range(WORLD)]
    single, _ = _run_trainer(str(tmp_path / "single"), GLOBAL_BATCH)
    want = _state(single)
    for name in want:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"ranks differ in {name}"
        torch.testing.assert_close(ranks[0]["state"][name], want[name], atol=1e-5, rtol=1e-4, msg=name)
