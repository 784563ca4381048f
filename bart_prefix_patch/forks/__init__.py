"""Forked upstream functions, one module per transformers shape family.

Each fork module exposes ``FAMILIES`` (the family names it serves) and
``patches()``: ``(owner, attribute, wrapper)`` triples the patcher installs
with wrapt's resolve_path/apply_patch. A fork is only reached when a prefix is active for the module in
question; otherwise the wrapper calls the untouched upstream function.
"""
