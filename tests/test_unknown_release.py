"""Releases the fingerprint table does not know: refuse (default) or verify by behaviour.

The subprocess tests alter an upstream function *before* ``import
bart_prefix_patch``, as a new transformers release would: a source-only
drift (a harmless extra statement: new fingerprint, same behaviour) must be
accepted under ``verify`` and refused under ``refuse``; a behaviour drift
must be refused under ``verify``, naming the check that failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers.models.bart import modeling_bart

import bart_prefix_patch as bpp
from bart_prefix_patch import _compat, _selfcheck

ENV = "BART_PREFIX_PATCH_UNKNOWN"

# Rewrites one upstream function from its own source (decorators included) and
# installs the result where the module and BART look it up. The rewritten
# source is written to a file, so inspect.getsource (the gate's fingerprint) reads it.
ALTER = textwrap.dedent(
    """
    import ast, importlib, inspect, json, os, sys, tempfile, textwrap, warnings
    import torch

    def alter(module_name, qualname, how):
        module = importlib.import_module(module_name)
        owner_name, _, name = qualname.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        function = inspect.unwrap(vars(owner)[name])
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        node = tree.body[0]
        if how == "source":  # same behaviour, new fingerprint
            node.body.insert(0, ast.parse("_bpp_unused = 0").body[0])
        else:  # behaviour: every returned value is scaled
            for ret in [n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]:
                ret.value = ast.BinOp(ret.value, ast.Mult(), ast.Constant(1.5))
        for call in ast.walk(node):  # zero-argument super() needs the class cell: spell it out
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "super" and not call.args:
                call.args = [ast.Name(owner_name, ast.Load()), ast.Name("self", ast.Load())]
        path = os.path.join(tempfile.mkdtemp(), "altered_" + name + ".py")
        source = ast.unparse(ast.fix_missing_locations(tree))
        with open(path, "w") as handle:
            handle.write(source)
        namespace = dict(vars(module))
        exec(compile(source, path, "exec"), namespace)
        setattr(owner, name, namespace[name])
        bart = importlib.import_module("transformers.models.bart.modeling_bart")
        if not owner_name and getattr(bart, name, None) is not None:
            setattr(bart, name, namespace[name])  # BART's own binding of an imported helper

    def report(bpp, caught, **extra):
        gate = bpp.gate()
        print("RESULT " + json.dumps(dict(
            applied=bpp.is_applied(), accepted_by=gate.accepted_by, family=gate.family,
            mismatched=gate.mismatched,
            warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
            failed=[c.name for c in gate.selfcheck.failed] if gate.selfcheck else None, **extra)))
    """
)


def _run(body: str, mode: str | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["OMP_NUM_THREADS"] = "1"
    if mode is not None:
        env[ENV] = mode
    code = ALTER + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]


# Shared upstream code every model relies on (present in every supported release): a drift there
# makes the whole release unknown. (A drift in one model's own code refuses that model alone:
# tests/test_patching.py.)
TARGET = ("transformers.cache_utils", "EncoderDecoderCache.get_seq_length")
KEY = "transformers.cache_utils:EncoderDecoderCache.get_seq_length"


def test_source_drift_refused_by_default_then_verified_on_request():
    body = f"""
        alter(*{TARGET!r}, "source")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bart_prefix_patch as bpp
        report(bpp, caught)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bpp.apply(unknown="verify")      # the argument beats the (unset) environment variable
        import contextlib, io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            from bart_prefix_patch._doctor import doctor
            code = doctor()
        report(bpp, caught, doctor=out.getvalue(), doctor_code=code)
    """
    refused, verified = _run(body, mode=None)
    assert not refused["applied"] and refused["accepted_by"] is None
    assert KEY in refused["mismatched"]
    message = refused["warnings"][-1]
    assert "not patched" in message and "BART_PREFIX_PATCH_UNKNOWN=verify" in message and KEY in message

    assert verified["applied"] and verified["accepted_by"] == "self-check" and verified["failed"] == []
    message = verified["warnings"][-1]
    assert "verified by the self-check" in message and transformers_version() in message and KEY in message
    assert "accepted by: the self-check" in verified["doctor"] and verified["doctor_code"] == 0


def test_source_drift_verified_at_import_and_argument_beats_environment():
    body = f"""
        alter(*{TARGET!r}, "source")
        torch.manual_seed(1234)
        rng, seed = torch.get_rng_state(), torch.initial_seed()
        torch.set_num_threads(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bart_prefix_patch as bpp
        untouched = torch.equal(rng, torch.get_rng_state()) and seed == torch.initial_seed()
        threads = torch.get_num_threads()
        first = bpp.gate().selfcheck
        sys.path.insert(0, "tests")
        from reference import tiny_model, random_prefix, reference_logits
        model = tiny_model(seed=0, attn_implementation="sdpa")
        ns = random_prefix(model.config)
        prefix = bpp.Prefix(encoder=ns.encoder, decoder=ns.decoder, cross=ns.cross)
        ids = torch.randint(3, 60, (2, 5)); dec = torch.randint(3, 60, (2, 4))
        error = (model(ids, decoder_input_ids=dec, prefix=prefix).logits.double()
                 - reference_logits(model, ids, dec, prefix=prefix)).abs().max().item()
        report(bpp, caught, untouched=untouched, threads=threads, error=error)
        bpp.revert()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            refused = bpp.apply(unknown="refuse")   # beats BART_PREFIX_PATCH_UNKNOWN=verify
        report(bpp, caught, returned=refused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = bpp.apply()
        report(bpp, caught, returned=again, same_result=bpp.gate().selfcheck is first)
    """
    at_import, refused, again = _run(body, mode="verify")
    assert at_import["applied"] and at_import["accepted_by"] == "self-check" and at_import["family"] in _compat.FORK_MODULES
    assert "verified by the self-check" in at_import["warnings"][-1]
    assert at_import["untouched"] and at_import["threads"] == 2  # user's RNG and thread count unchanged
    assert at_import["error"] < 1e-4
    assert refused["returned"] is False and not refused["applied"]
    assert "BART_PREFIX_PATCH_UNKNOWN=verify" in refused["warnings"][-1]
    assert again["returned"] is True and again["accepted_by"] == "self-check"
    assert again["same_result"]  # the self-check ran once in the process


@pytest.mark.parametrize(
    "target, failing",
    [
        # Positions scaled: stock output drifts from BART's math; the reference notices.
        (("transformers.models.bart.modeling_bart", "BartLearnedPositionalEmbedding.forward"), "forward == reference"),
    ],
)
def test_behaviour_drift_is_refused_under_verify(target, failing):
    body = f"""
        alter(*{target!r}, "behaviour")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bart_prefix_patch as bpp
        from transformers.models.bart import modeling_bart
        original = bpp.get_original(modeling_bart.BartAttention, "forward")
        wrapped = modeling_bart.BartAttention.__dict__["forward"] is not original
        bart, applied = bpp.gate().models.get("bart"), bpp.is_applied()
        bpp.revert()
        try:
            bpp.apply(strict=True)
            raised = None
        except bpp.UnsupportedTransformersError as error:
            raised = str(error)
        report(bpp, caught, wrapped=wrapped, raised=raised, bart=bart, applied_at_import=applied)
    """
    (result,) = _run(body, mode="verify")
    # BART's own code drifted: BART alone is refused (its self-check failed), the other models stay patched.
    assert result["applied_at_import"] and result["bart"]
    assert not result["wrapped"]  # BART's fork was uninstalled again
    assert result["failed"] and any(failing in name for name in result["failed"])
    assert any("self-check" in m and "failed" in m and failing in m and transformers_version() in m
               for m in result["warnings"]), result["warnings"]
    assert result["raised"] and failing in result["raised"]


def transformers_version() -> str:
    import transformers

    return transformers.__version__


# ------------------------------------------------------------- in process


def test_selfcheck_passes_here_and_leaves_rng_and_threads_alone():
    torch.manual_seed(4321)
    rng, seed, threads = torch.get_rng_state(), torch.initial_seed(), torch.get_num_threads()
    bpp.revert()
    result = _selfcheck.run_selfcheck(lambda: bpp.apply(strict=True), bpp.revert)
    assert result.passed, result.summary()
    names = {check.name.split(" [")[0] for check in result.checks}
    assert {"no prefix: bitwise identical to unpatched", "all three sites: forward == reference",
            "cross prefix keeps the encoder", "greedy generate == reference greedy decoding",
            "beam search with cache == without", "gradients reach the prefix"} <= names
    assert {check.name.rsplit("[", 1)[1] for check in result.checks} == {"eager]", "sdpa]"}
    assert torch.equal(rng, torch.get_rng_state()) and seed == torch.initial_seed()
    assert threads == torch.get_num_threads()


def test_selfcheck_fails_without_the_forks():
    """With the forks' prefix path broken (stock attention under a prefix), the checks fail."""
    bpp.revert()
    original = modeling_bart.BartAttention.forward
    check = _selfcheck.SelfCheck()
    check.prepare()
    bpp.apply(strict=True)
    modeling_bart.BartAttention.forward = original  # stock attention: the prefix is dropped
    try:
        result = check.verify()
    finally:
        bpp.revert()
    assert not result.passed
    failed = {c.name.split(" [")[0] for c in result.failed}
    assert "all three sites: forward == reference" in failed and "gradients reach the prefix" in failed


def test_feature_detection_agrees_with_the_table():
    gate = bpp.gate()
    assert gate.accepted_by in ("table", "self-check")
    family, fork, how = _compat.detect_fork()
    assert fork is gate.fork, how
    if gate.accepted_by == "table":
        assert family == gate.family, how


def test_gate_says_table_for_a_known_release():
    gate = bpp.gate()
    if not gate.in_table:
        pytest.skip("this transformers is not in the table (accepted by the self-check)")
    assert gate.accepted_by == "table" and gate.selfcheck is None


def test_invalid_unknown_value_raises():
    with pytest.raises(ValueError):
        bpp.apply(unknown="maybe")


def _plus_one(x):
    return x + 1


def _minus_one(x):
    return x - 1


def test_a_fingerprint_is_kept_per_code_object_so_a_replaced_function_is_hashed_afresh():
    """apply() after revert() reuses the hashes of the restored originals, never a stale one."""
    from bart_prefix_patch._fingerprint import fingerprint_object, fingerprint_source

    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    plus, minus = fingerprint_source(source, "_plus_one"), fingerprint_source(source, "_minus_one")
    assert plus != minus

    def function(x):
        return x

    function.__code__ = _plus_one.__code__
    assert fingerprint_object(function) == fingerprint_object(function) == plus
    function.__code__ = _minus_one.__code__  # replaced in place: same function object, new code
    assert fingerprint_object(function) == minus
