"""Benchmark 3: do the prefixes learn? Prefix-tuning a frozen, locally pretrained BART on unseen tasks.

    python benchmarks/bench_learning.py            # full: 3 tasks x 3 seeds x 7 rows (~15 min, one core)
    python benchmarks/bench_learning.py --quick    # CI smoke test (tiny model, a few steps)

A small BART is pretrained here by denoising a synthetic language
(benchmarks/_learning.py), frozen, then trained for a fixed budget (same steps,
batch and data order for every row) on tasks it never saw: ``reverse``, ``sort``
and ``map`` (a fixed token permutation). Metric: exact match of greedy
``generate()`` on held-out inputs (and, as a diagnostic, teacher-forced exact
match: argmax of the training forward). Rows:

* full prefix: encoder + decoder + cross-attention prefixes, this package;
* decoder + cross; decoder only (the setting PEFT's prefix effectively trains);
* the seed's fix: encoder + decoder prefixes, no cross-attention prefix;
* stock behaviour (BASELINE, emulated): unpatched transformers (``bpp.revert()``),
  decoder + cross prefix handed over the usual way, as a prefilled
  ``EncoderDecoderCache`` (self-attention part: decoder prefix; cross part: cross
  prefix). Stock BART then uses the cross prefix *instead of* the encoder and shifts
  decoder positions by P; evaluated with stock ``generate()`` and a fresh prefilled cache;
* PEFT 0.21.2 prefix-tuning as shipped (patch reverted; needs ``peft``);
* full fine-tuning (every weight trainable, no prefix).

All prefix rows use the same prefix length and MLP reparameterisation (PEFT:
``prefix_projection=True`` with the same width) and learning rate.
"""

from __future__ import annotations

import _common as C  # noqa: I001  (first: pins torch to one thread)

import contextlib
import copy
import random
import statistics
import sys
import time

import torch

import _learning as L
from learning_grid import percent_cell, seed_values

bpp = C.bpp

ROWS = {
    "full prefix (enc+dec+cross)": ("encoder", "decoder", "cross"),
    "decoder + cross": ("decoder", "cross"),
    "decoder only (PEFT's effective setting)": ("decoder",),
    "seed's fix (enc+dec, no cross)": ("encoder", "decoder"),
    "stock behaviour (cross replaces encoder)": "stock",
    "PEFT as shipped": "peft",
    "full fine-tuning": "full",
}


@contextlib.contextmanager
def nothing():
    yield


class Run:
    """One row on one task with one seed: set-up, a training step, evaluation."""

    def __init__(self, kind, base, settings, seed):
        self.kind, self.settings, self.seed = kind, settings, seed
        self.model = copy.deepcopy(base)
        torch.manual_seed(1000 + seed)
        s = settings
        self.context = nothing
        if isinstance(kind, tuple):
            self.module = bpp.add_prefix_tuning(self.model, prefix_length=s.prefix_length, sites=kind,
                                                hidden_size=s.hidden_size)
            parameters, lr = list(self.module.parameters()), s.prefix_lr
        elif kind == "stock":
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
            self.module = bpp.PrefixEncoder(self.model.config, prefix_length=s.prefix_length,
                                            sites=("decoder", "cross"), hidden_size=s.hidden_size)
            parameters, lr = list(self.module.parameters()), s.prefix_lr
            self.context = C.stock
        elif kind == "peft":
            from peft import PrefixTuningConfig, TaskType, get_peft_model

            with C.stock():
                self.peft = get_peft_model(self.model, PrefixTuningConfig(
                    task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=s.prefix_length, prefix_projection=True,
                    encoder_hidden_size=s.hidden_size))
            parameters, lr = [p for p in self.peft.parameters() if p.requires_grad], s.prefix_lr
            self.context = C.peft_as_shipped
        else:  # full fine-tuning
            for parameter in self.model.parameters():
                parameter.requires_grad_(True)
            parameters, lr = list(self.model.parameters()), s.full_lr
        self.parameters = parameters
        self.trainable = sum(p.numel() for p in parameters)
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)

    # ---- the stock emulation: the prefix as a prefilled cache (what stock BART does with it)
    def cache(self, batch: int):
        from transformers import DynamicCache, EncoderDecoderCache

        prefix = self.module()
        own, cross = DynamicCache(), DynamicCache()
        for layer, ((k, v), (ck, cv)) in enumerate(zip(prefix.decoder, prefix.cross)):
            own.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
            cross.update(ck.expand(batch, -1, -1, -1), cv.expand(batch, -1, -1, -1), layer)
        return EncoderDecoderCache(own, cross)  # is_updated: the cross part counts as already computed

    def forward(self, batch: dict):
        if self.kind == "stock":
            # No encoder padding mask: stock BART would build the cross mask for the source length, but
            # the cross keys are the prefix's P columns (the encoder output is not looked at anyway).
            inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
            return self.model(**inputs, past_key_values=self.cache(batch["input_ids"].shape[0]))
        if self.kind == "peft":
            return self.peft(**batch)
        return self.model(**batch)

    def step(self, batch: dict) -> float:
        """One optimizer step; call inside ``self.context()`` (entered once per run: revert/apply is slow)."""
        self.model.train()
        loss = self.forward(batch).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.eval()
        return loss.item()

    def evaluate(self, sources, batch, targets) -> dict:
        with torch.no_grad():
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if self.kind == "stock":
                predictions = L.greedy(self.model, ids, None, past_key_values=self.cache(ids.shape[0]))
            elif self.kind == "peft":
                predictions = L.greedy(self.peft, ids, mask)
            else:
                predictions = L.greedy(self.model, ids, mask)
            logits = self.forward(batch).logits
        labels = batch["labels"]
        agree = (logits.argmax(-1) == labels) | (labels == -100)
        return {"exact": L.exact_match(predictions, targets), "teacher_forced": agree.all(-1).float().mean().item(),
                "distinct_outputs": len({tuple(p) for p in predictions})}


class Settings:
    def __init__(self, quick: bool, args):
        self.sizes = L.QUICK_SIZES if quick else L.Sizes(d_model=64, layers=2, heads=4, ffn=128,
                                                        pretrain_steps=1500, pretrain_lr=3e-3)
        self.steps = args.steps or (12 if quick else 1000)
        self.batch = 32
        self.eval_every = args.eval_every or (6 if quick else 100)
        self.eval_size = 32 if quick else 256
        self.prefix_length = args.prefix_length
        self.hidden_size = 128 if not quick else 32
        self.prefix_lr = args.prefix_lr
        self.full_lr = args.full_lr
        self.seeds = list(range(args.seeds or (1 if quick else 3)))
        self.tasks = args.tasks or (["reverse"] if quick else ["reverse", "sort", "map"])


def train_one(kind, base, settings, task_name, task, seed, log) -> dict:
    run = Run(kind, base, settings, seed)
    rng = random.Random(10_000 * seed + sum(map(ord, task_name)))  # the same data order for every row
    eval_rng = random.Random(777)
    eval_sources, eval_batch = L.task_batch(eval_rng, task, settings.sizes, settings.eval_size)
    eval_targets = [task(s) for s in eval_sources]
    curve = []
    losses = []
    started = time.perf_counter()
    with run.context():
        curve.append({"step": 0, "loss": None, **run.evaluate(eval_sources, eval_batch, eval_targets)})
        for step in range(1, settings.steps + 1):
            _, batch = L.task_batch(rng, task, settings.sizes, settings.batch)
            losses.append(run.step(batch))
            if step % settings.eval_every == 0 or step == settings.steps:
                curve.append({"step": step, "loss": statistics.mean(losses[-settings.eval_every:]),
                              **run.evaluate(eval_sources, eval_batch, eval_targets)})
    final = curve[-1]
    log(f"  {task_name:<8} seed {seed} {kind if isinstance(kind, str) else '+'.join(kind):<24} "
        f"exact {100 * final['exact']:5.1f}%  teacher-forced {100 * final['teacher_forced']:5.1f}%  "
        f"loss {final['loss']:.3f}  ({time.perf_counter() - started:.0f} s)")
    return {"curve": curve, "final": final, "trainable": run.trainable, "seconds": time.perf_counter() - started}


def main() -> int:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; --quick 12)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="seeds per (task, row) (default 3; --quick 1)")
    p.add_argument("--tasks", nargs="+", default=None, choices=["reverse", "sort", "map"])
    p.add_argument("--rows", nargs="+", default=None, help="subset of rows (names as in the table, or indices)")
    p.add_argument("--prefix-length", type=int, default=8)
    p.add_argument("--prefix-lr", type=float, default=1e-2)
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--pretrained", default=None, help="load/save the pretrained model state here (saves time)")
    args = p.parse_args()
    settings = Settings(args.quick, args)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    rows = dict(ROWS)
    if args.rows:
        names = list(ROWS)
        rows = {(names[int(r)] if r.isdigit() else r): ROWS[names[int(r)] if r.isdigit() else r] for r in args.rows}
    peft_ok = C.peft_status()[0]
    if not peft_ok:
        rows.pop("PEFT as shipped", None)

    # 1. Pretraining (or a saved result of it).
    import os

    if args.pretrained and os.path.exists(args.pretrained):
        base = L.BartForConditionalGeneration._from_config(L.model_config(settings.sizes), attn_implementation="sdpa")
        saved = torch.load(args.pretrained)
        base.load_state_dict(saved["state"])
        report = saved["report"]
        base.eval()
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        log(f"pretrained model loaded from {args.pretrained}")
    else:
        log(f"pretraining ({settings.sizes.pretrain_steps} steps)")
        base, report = L.pretrain(settings.sizes, seed=0, log=log)
        if args.pretrained:
            torch.save({"state": base.state_dict(), "report": report}, args.pretrained)
    log(f"pretrained: {report}")

    # 2. Every row x task x seed, fixed budget.
    tasks = L.make_tasks()
    results = {"settings": {"sizes": vars(settings.sizes), "steps": settings.steps, "batch": settings.batch,
                            "eval_size": settings.eval_size, "prefix_length": settings.prefix_length,
                            "hidden_size": settings.hidden_size, "prefix_lr": settings.prefix_lr,
                            "full_lr": settings.full_lr, "seeds": settings.seeds, "tasks": settings.tasks},
               "pretraining": report, "runs": {}}
    for task_name in settings.tasks:
        for name, kind in rows.items():
            for seed in settings.seeds:
                results["runs"][f"{task_name}|{name}|{seed}"] = train_one(
                    kind, base, settings, task_name, tasks[task_name], seed, log)

    # 3. Tables.
    def cell(task_name, name, key):
        return percent_cell(seed_values(results, task_name, name, key))

    table_rows = []
    for name in rows:
        trainable = results["runs"][f"{settings.tasks[0]}|{name}|{settings.seeds[0]}"]["trainable"]
        table_rows.append([name, f"{trainable:,}"] + [cell(t, name, "exact") for t in settings.tasks])
    print(f"\nExact match (%) of greedy generate() on {settings.eval_size} held-out inputs after {settings.steps} "
          f"steps (batch {settings.batch}), mean ± std over {len(settings.seeds)} seed(s); frozen BART "
          f"(d_model {settings.sizes.d_model}, {settings.sizes.layers}+{settings.sizes.layers} layers, "
          f"{report['parameters']:,} parameters) pretrained here by denoising; prefix length "
          f"{settings.prefix_length}, MLP {settings.hidden_size}")
    print(C.table(["row", "trainable params"] + settings.tasks, table_rows))
    tf_rows = [[name] + [cell(t, name, "teacher_forced") for t in settings.tasks] for name in rows]
    print("\nDiagnostic: teacher-forced exact match (%) (argmax of the training forward == target, every token)")
    print(C.table(["row"] + settings.tasks, tf_rows))
    if not peft_ok:
        print(C.PEFT_HOWTO.replace("<script>", "bench_learning"))
    results["wall_s"] = time.perf_counter() - started
    results["cpu_s"] = time.process_time()
    print(f"\npretraining: {report['steps']} steps, loss {report['final_loss']:.3f}, copy exact "
          f"{100 * report['copy_exact']:.1f}%, denoise exact {100 * report['denoise_exact']:.1f}%, "
          f"{report['seconds']:.0f} s")
    print(f"wall time {results['wall_s']:.0f} s (CPU {results['cpu_s']:.0f} s)")
    C.write_results("learning", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
