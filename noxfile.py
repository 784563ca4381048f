"""Compatibility matrix: the full test suite once per pinned transformers release.

    nox                       # every pinned release
    nox -s "tests(5.3.0)"     # one of them
    nox -s latest             # newest transformers: are its fingerprints known? (non-blocking)

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

nox.options.sessions = [f"tests({pin})" for pin in PINS]
nox.options.reuse_existing_virtualenvs = True
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@nox.session(name="tests")
@nox.parametrize("pin", list(PINS), ids=list(PINS))
def tests(session: nox.Session, pin: str) -> None:
    """The whole suite against one pinned transformers release."""
    # The pin file goes in as a constraint too, so `-e .` cannot move it.
    requirement = f"requirements/transformers-{pin}.txt"
    session.install("-c", "constraints-matrix.txt", "-c", requirement, "-r", requirement, "-e", ".[test]")
    session.run("python", "-m", "bart_prefix_patch", "doctor", env=ENV)
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs, env=ENV)


@nox.session
def latest(session: nox.Session) -> None:
    """Newest transformers from the registry: report whether the gate knows it (never fails)."""
    session.install("-c", "constraints-matrix.txt", "wrapt", "pytest")
    session.install("-c", "constraints-matrix.txt", "--upgrade", "transformers")
    session.install("--no-deps", "-e", ".")
    session.run(
        "python", "-c",
        "import warnings; warnings.simplefilter('ignore'); import transformers, bart_prefix_patch as b; "
        "g = b.gate(); print(f'transformers {transformers.__version__}: ' + "
        "('known, family ' + g.family if g.ok else 'NOT KNOWN: ' + g.message))",
        env=ENV,
    )
