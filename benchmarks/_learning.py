"""Pieces of benchmark 3: a synthetic language, a small BART pretrained on it by denoising, new tasks.

Nothing is downloaded. The "language" is a random bigram Markov chain over
``N_CONTENT`` content tokens (so text has structure a denoiser can learn); the
pretraining objective is BART's: reconstruct the original from a corrupted copy
(token masking, token deletion, span infilling with a single ``<mask>``). The
tasks used for prefix-tuning never appear in pretraining:

* ``reverse``: the tokens in reverse order;
* ``sort``: the tokens in ascending id order;
* ``map``: every token replaced through a fixed random permutation of the content vocabulary.

Task inputs are uniformly random content tokens (not the Markov language).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import BartConfig, BartForConditionalGeneration

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
N_SPECIAL = 5
N_CONTENT = 16
VOCAB = N_SPECIAL + N_CONTENT


@dataclass
class Sizes:
    """Model and schedule sizes (full run, or ``QUICK``)."""

    d_model: int = 128
    layers: int = 3
    heads: int = 4
    ffn: int = 256
    pretrain_steps: int = 2500
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    doc_min: int = 6
    doc_max: int = 14
    task_min: int = 4
    task_max: int = 8
    max_positions: int = 64


QUICK_SIZES = Sizes(d_model=32, layers=1, heads=2, ffn=64, pretrain_steps=40, pretrain_batch=32, doc_min=3,
                    doc_max=6, task_min=2, task_max=4)


def model_config(sizes: Sizes) -> BartConfig:
    return BartConfig(
        vocab_size=VOCAB, d_model=sizes.d_model, encoder_layers=sizes.layers, decoder_layers=sizes.layers,
        encoder_attention_heads=sizes.heads, decoder_attention_heads=sizes.heads, encoder_ffn_dim=sizes.ffn,
        decoder_ffn_dim=sizes.ffn, max_position_embeddings=sizes.max_positions, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
        forced_bos_token_id=None, forced_eos_token_id=None, mask_token_id=MASK,
    )


# ------------------------------------------------------------------ data


class Language:
    """A random bigram Markov chain over the content tokens (a few likely successors per token)."""

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        self.rows = []
        for _ in range(N_CONTENT):
            weights = [rng.random() ** 4 for _ in range(N_CONTENT)]  # peaked: text has structure
            total = sum(weights)
            self.rows.append([w / total for w in weights])

    def sample(self, rng: random.Random, length: int) -> list[int]:
        token = rng.randrange(N_CONTENT)
        out = [token]
        for _ in range(length - 1):
            token = rng.choices(range(N_CONTENT), weights=self.rows[token])[0]
            out.append(token)
        return [N_SPECIAL + t for t in out]


def corrupt(rng: random.Random, tokens: list[int]) -> list[int]:
    """BART-style noise: mask 15% of tokens, delete 10%, replace one span (length 0-3) by one <mask>."""
    out = []
    for token in tokens:
        u = rng.random()
        if u < 0.15:
            out.append(MASK)
        elif u < 0.25:
            continue
        else:
            out.append(token)
    if out and rng.random() < 0.5:
        start = rng.randrange(len(out))
        span = rng.randint(0, 3)
        out[start:start + span] = [MASK]
    return out


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def encode(sources: list[list[int]], targets: list[list[int]]) -> dict:
    """Model inputs: ``<s> x </s>`` sources (padded, with mask), ``<s> y </s>`` labels (padding -100)."""
    input_ids = _pad([[BOS, *s, EOS] for s in sources], PAD)
    labels = _pad([[BOS, *t, EOS] for t in targets], -100)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels}


def pretraining_batch(rng: random.Random, language: Language, sizes: Sizes, batch: int) -> dict:
    docs = [language.sample(rng, rng.randint(sizes.doc_min, sizes.doc_max)) for _ in range(batch)]
    return encode([corrupt(rng, d) for d in docs], docs)


def make_tasks(seed: int = 0) -> dict[str, Callable[[list[int]], list[int]]]:
    permutation = list(range(N_CONTENT))
    random.Random(seed + 99).shuffle(permutation)
    return {
        "reverse": lambda s: list(reversed(s)),
        "sort": lambda s: sorted(s),
        "map": lambda s: [N_SPECIAL + permutation[t - N_SPECIAL] for t in s],
    }


def task_batch(rng: random.Random, task: Callable, sizes: Sizes, batch: int) -> tuple[list, dict]:
    sources = [[N_SPECIAL + rng.randrange(N_CONTENT) for _ in range(rng.randint(sizes.task_min, sizes.task_max))]
               for _ in range(batch)]
    return sources, encode(sources, [task(s) for s in sources])


# ----------------------------------------------------------------- model


def pretrain(sizes: Sizes, seed: int = 0, log: Callable[[str], None] = print) -> tuple[BartForConditionalGeneration, dict]:
    """A small BART pretrained by denoising on the Markov language; returns (model, report)."""
    torch.manual_seed(seed)
    model = BartForConditionalGeneration._from_config(model_config(sizes), attn_implementation="sdpa")
    language = Language(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=sizes.pretrain_lr, total_steps=sizes.pretrain_steps,
                                                   pct_start=0.1)
    model.train()
    started = time.perf_counter()
    losses = []
    for step in range(sizes.pretrain_steps):
        loss = model(**pretraining_batch(rng, language, sizes, sizes.pretrain_batch)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, sizes.pretrain_steps // 5) == 0:
            log(f"  pretraining {step + 1}/{sizes.pretrain_steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # Denoising quality on held-out documents: exact reconstruction rate.
    eval_rng = random.Random(seed + 1000)
    docs = [language.sample(eval_rng, eval_rng.randint(sizes.doc_min, sizes.doc_max)) for _ in range(256)]
    clean = encode(docs, docs)
    noisy = encode([corrupt(eval_rng, d) for d in docs], docs)
    report = {
        "steps": sizes.pretrain_steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": time.perf_counter() - started,
        "copy_exact": exact_match(greedy(model, clean["input_ids"], clean["attention_mask"]), docs),
        "denoise_exact": exact_match(greedy(model, noisy["input_ids"], noisy["attention_mask"]), docs),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, report


def strip(row: list[int]) -> list[int]:
    """Generated ids -> content tokens: drop the start tokens, stop at the first </s> after them."""
    out = []
    for token in row[1:]:  # row[0] is the decoder start token
        if token == EOS:
            break
        if token in (BOS, PAD):
            continue
        out.append(token)
    return out


def greedy(model, input_ids, attention_mask, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=input_ids.shape[1] + 2,
                             num_beams=1, do_sample=False, **kwargs)
    return [strip(row) for row in out.tolist()]


def exact_match(predictions: list[list[int]], targets: list[list[int]]) -> float:
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)
