"""Graph breaks of a compiled ``generate()`` without a prefix: the same count as stock (11 on 5.24).

Tracing all of ``generate()`` takes about a minute, so this runs once, in the
README's test command (the newest pinned release); the matrix sessions run
tests/test_compile.py's forward count (noxfile.py ignores this file, as it
ignores the benchmarks' smoke test).
"""

from __future__ import annotations

from test_compile import graph_breaks


def test_generate_without_prefix_has_stock_graph_breaks():
    stock, patched = graph_breaks(generate=True)
    assert patched["forward"] == stock["forward"], patched["reasons"]
    assert patched["generate"] == stock["generate"]
