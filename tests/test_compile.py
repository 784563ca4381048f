"""torch.compile: importing the package adds no graph break to a model without a prefix.

Counts, not times (benchmarks/ measure speed). The stock counts come from a
subprocess that never imports bart_prefix_patch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import bart_prefix_patch as bpp

_COUNT = r"""
import json, sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
import torch, torch._dynamo
torch.set_num_threads(1)
from reference import tiny_model
model = tiny_model(seed=0, attn_implementation="sdpa")
ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
dec = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(2))

def counts():
    torch._dynamo.reset()
    forward = torch._dynamo.explain(model)(ids, decoder_input_ids=dec)
    result = {{"forward": forward.graph_break_count, "reasons": [str(r.reason)[:200] for r in forward.break_reasons]}}
    if {generate!r}:
        torch._dynamo.reset()
        result["generate"] = torch._dynamo.explain(model.generate)(ids, max_new_tokens=2, do_sample=False).graph_break_count
    return result

stock = counts()  # before the package is imported: stock transformers
import bart_prefix_patch  # patches the classes of the model built above too
print(json.dumps({{"stock": stock, "patched": counts()}}))
"""


def graph_breaks(generate: bool) -> tuple[dict, dict]:
    """Graph breaks of a tiny BART without a prefix: ``(stock, patched)``.

    One subprocess counts stock transformers first, then imports the package
    (which patches the classes of the model already built) and counts again.
    """
    code = _COUNT.format(tests=str(Path(__file__).parent), generate=generate)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["stock"], result["patched"]


def test_forward_without_prefix_has_stock_graph_breaks():
    stock, patched = graph_breaks(generate=False)
    # Stock is 0 on 5.x; 4.52 logs inside forward (3 breaks), which the patch must not add to.
    assert patched["forward"] == stock["forward"], patched["reasons"]


def test_attach_after_compile_reaches_the_compiled_model():
    """A graph compiled before attach() must not keep running without the prefix."""
    from conftest import fresh_dynamo, make_prefix
    from reference import reference_logits, tiny_model

    fresh_dynamo()
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
