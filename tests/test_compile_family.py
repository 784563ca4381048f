"""torch.compile of a prefixed forward on every relative: one graph, equal to the reference.

The relatives share BART's fork; whether a prefixed call is traced depends on
each layer handing its ``**kwargs`` to the attention, which this checks per
model type. Dynamo tracing costs seconds per model, so noxfile.py leaves this
file to the README's test command (5.24) and the newest release
(docs/how-it-works.md lists the releases it was run on).
"""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_dynamo, source_batch
from models import MODELS, available, decoder_vocab_size, tiny_family_model
from reference import random_prefix, reference_logits
from torch._dynamo.testing import CompileCounterWithBackend

import bart_prefix_patch as bpp
from bart_prefix_patch import _state


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_every_relative_compiles_its_prefix(model_type):
    if not available(model_type):
        pytest.skip(f"{model_type} is not in this release")
    model = tiny_family_model(model_type, seed=0, attn_implementation="eager")
    ns = random_prefix(model.config, scale=2.0)
    prefix = bpp.Prefix(encoder=ns.encoder, decoder=ns.decoder, cross=ns.cross)
    vocab = decoder_vocab_size(model.config)
    ids, mask = source_batch(model.config, pad_last=1)
    dec = torch.randint(3, vocab, (2, 5), generator=torch.Generator().manual_seed(2))
    fresh_dynamo()
    counter = CompileCounterWithBackend("eager")
    got = torch.compile(model, backend=counter)(ids, attention_mask=mask, decoder_input_ids=dec, prefix=prefix).logits
    want = reference_logits(model, ids, dec, attention_mask=mask, prefix=prefix)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    if _state.traceable(type(model)):  # 5.4+: traced into one graph; older releases run it eagerly
        assert counter.frame_count == 1, f"{counter.frame_count} graphs"
