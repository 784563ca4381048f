"""Compatibility matrix: the full test suite once per pinned transformers release.

    nox                       # every pinned release
    nox -s "tests(5.3.0)"     # one of them
    nox -s latest             # newest transformers: are its fingerprints known? (non-blocking)
    nox -s "peft(0.21.2-5.24.0)"  # with peft: the PEFT integration (tests/test_peft.py) and the suite

Each session is its own virtual environment with torch 2.13.0 (the local CPU
wheel, pinned in constraints.txt) and one ``requirements/transformers-X.txt``.
"""

from __future__ import annotations

import nox

#: release -> shape family (docs/supported-versions.md).
PINS = {
    "4.44.2": "A1",
    "4.51.3": "A2",
    "4.52.4": "B",
    "4.57.6": "C",
    "5.3.0": "D",
    "5.23.0": "E",
    "5.24.0": "E2",
}

#: (peft, transformers) pairs of the PEFT integration sessions (docs/peft.md), one
#: ``requirements/peft-P-transformers-T.txt`` each.
PEFT_PAIRS = [("0.21.2", "5.24.0"), ("0.21.2", "4.57.6")]
PEFT_IDS = [f"{peft_pin}-{transformers_pin}" for peft_pin, transformers_pin in PEFT_PAIRS]
PEFT_SESSIONS = [f"peft({pair})" for pair in PEFT_IDS]

nox.options.sessions = [f"tests({pin})" for pin in PINS] + PEFT_SESSIONS
nox.options.reuse_existing_virtualenvs = True
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
#: The benchmarks' --quick smoke test and the compiled-generate() graph-break count run once, in
#: the README's test command (5.24.0); repeating their minutes in every session would not test the
#: patch any further (tests/test_compile.py's forward count runs everywhere).
PYTEST = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_benchmarks_quick.py",
          "--ignore=tests/test_compile_generate.py")


@nox.session(name="tests")
@nox.parametrize("pin", list(PINS), ids=list(PINS))
def tests(session: nox.Session, pin: str) -> None:
    """The whole suite against one pinned transformers release."""
    # The pin file goes in as a constraint too, so `-e .` cannot move it.
    requirement = f"requirements/transformers-{pin}.txt"
    session.install("-c", "constraints-matrix.txt", "-c", requirement, "-r", requirement, "-e", ".[test]")
    session.run("python", "-m", "bart_prefix_patch", "doctor", env=ENV)
    session.run(*PYTEST, *session.posargs, env=ENV)


@nox.session(name="peft")
@nox.parametrize("pair", PEFT_IDS, ids=PEFT_IDS)
def peft_matrix(session: nox.Session, pair: str) -> None:
    """The whole suite (tests/test_peft.py included) with peft installed, for one (peft, transformers) pair."""
    peft_pin, transformers_pin = pair.split("-")
    requirement = f"requirements/peft-{peft_pin}-transformers-{transformers_pin}.txt"
    session.install("-c", "constraints-matrix.txt", "-c", requirement, "-r", requirement, "-e", ".[test,peft]")
    session.run("python", "-m", "bart_prefix_patch", "doctor", env=ENV)
    session.run(*PYTEST, *session.posargs, env=ENV)


@nox.session
def latest(session: nox.Session) -> None:
    """Newest transformers from the registry: report whether the gate knows it (never fails)."""
    session.install("-c", "constraints-matrix.txt", "torch", "wrapt", "pytest")
    session.install("-c", "constraints-matrix.txt", "--upgrade", "transformers")
    session.install("--no-deps", "-e", ".")
    session.run(
        "python", "-c",
        "import warnings; warnings.simplefilter('ignore'); import transformers, bart_prefix_patch as b; "
        "g = b.gate(); print(f'transformers {transformers.__version__}: ' + "
        "('known, family ' + g.family if g.ok else 'NOT KNOWN: ' + g.message))",
        env=ENV,
    )
