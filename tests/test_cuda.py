"""sdpa in fp16/bf16 on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prefix, source_batch, target_batch
from reference import reference_logits, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sdpa_half_precision_matches_reference(dtype):
    model = tiny_model(seed=0, attn_implementation="sdpa")
    config = model.config
    ids, mask = source_batch(config, pad_last=2)
    decoder_ids = target_batch(config)
    prefix = make_prefix(config)
    want = reference_logits(model, ids, decoder_ids, attention_mask=mask, prefix=prefix)
    device = torch.device("cuda")
    model = model.to(device=device, dtype=dtype)
    moved = type(prefix)(
        **{site: [(k.to(device), v.to(device)) for k, v in getattr(prefix, site)] for site in ("encoder", "decoder", "cross")}
    )  # float32 tensors: cast to the model's dtype by the patch
    got = model(ids.to(device), attention_mask=mask.to(device), decoder_input_ids=decoder_ids.to(device), prefix=moved)
    scale = want.abs().max().item()
    assert (got.logits.double().cpu() - want).abs().max().item() < 0.05 * scale
    # Tokens may legitimately differ from the float64 reference in half precision; generate must run.
    greedy = model.generate(ids.to(device), attention_mask=mask.to(device), prefix=moved, max_new_tokens=4)
    assert greedy.shape[0] == ids.shape[0]
