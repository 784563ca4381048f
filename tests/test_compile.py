"""torch.compile: importing the package adds no graph break to a model without a prefix.

Counts, not times (benchmarks/ measure speed). The stock counts come from a
subprocess that never imports bart_prefix_patch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bart_prefix_patch as bpp

_COUNT = r"""
import json, sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
import torch, torch._dynamo
torch.set_num_threads(1)
if {patched!r}:
    import bart_prefix_patch
from reference import tiny_model
model = tiny_model(seed=0, attn_implementation="sdpa")
ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
dec = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(2))
forward = torch._dynamo.explain(model)(ids, decoder_input_ids=dec)
torch._dynamo.reset()
generate = torch._dynamo.explain(model.generate)(ids, max_new_tokens=4, do_sample=False)
print(json.dumps({{"forward": forward.graph_break_count, "generate": generate.graph_break_count,
                  "reasons": [str(r.reason)[:200] for r in forward.break_reasons]}}))
"""


def _counts(patched: bool) -> dict:
    code = _COUNT.format(tests=str(Path(__file__).parent), patched=patched)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stock_counts():
    return _counts(patched=False)


def test_forward_without_prefix_has_stock_graph_breaks(stock_counts):
    patched = _counts(patched=True)
    # Stock is 0 on 5.x; 4.52 logs inside forward (3 breaks), which the patch must not add to.
    assert patched["forward"] == stock_counts["forward"], patched["reasons"]
    assert patched["generate"] == stock_counts["generate"]


def test_attach_after_compile_reaches_the_compiled_model():
    """A graph compiled before attach() must not keep running without the prefix."""
    import torch._dynamo
    from conftest import make_prefix
    from reference import reference_logits, tiny_model

    torch._dynamo.reset()
    model = tiny_model(seed=0, attn_implementation="sdpa")
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    model.forward = torch.compile(model.forward, backend="eager")
    plain = model(ids, decoder_input_ids=dec).logits
    prefix = make_prefix(model.config, scale=2.0)
    bpp.attach(model, prefix)
    try:
        got = model(ids, decoder_input_ids=dec).logits.double()
        torch.testing.assert_close(got, reference_logits(model, ids, dec, prefix=prefix), atol=1e-4, rtol=1e-4)
    finally:
        bpp.detach(model)
    assert torch.equal(model(ids, decoder_input_ids=dec).logits, plain)
