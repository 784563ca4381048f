"""Compatibility matrix: the full test suite once per pinned transformers release.

    nox                       # every pinned release
    nox -s "tests(5.3.0)"     # one of them
    nox -s latest             # newest transformers on the index: known? self-check? tests (non-blocking)
    nox -s "peft(0.21.2-5.24.0)"  # with peft: the PEFT integration (tests/test_peft.py) and the suite

Each session is its own virtual environment with torch 2.13.0 (the local CPU
wheel, pinned in constraints.txt) and one ``requirements/transformers-X.txt``.
"""

from __future__ import annotations

import configparser
import re

import nox
from nox.command import CommandFailed

#: release -> shape family (docs/supported-versions.md).
PINS = {
    "4.44.2": "A1",
    "4.51.3": "A2",
    "4.52.4": "B",
    "4.57.6": "C",
    "5.3.0": "D",
    "5.23.0": "E",
    "5.24.0": "E2",
    "5.25.0": "E2",
}

#: Pins installed with ``--no-deps`` plus transformers' other requirements (read from its
#: metadata): transformers 5.25 requires ``kernels>=0.19.1,<0.20``, which the package index
#: reachable here does not carry (its newest kernels is 0.17.2), so a plain install cannot
#: resolve. BART never imports ``kernels``.
NO_DEPS = {"5.25.0"}
#: Requirements of transformers that the index lacks and BART does not use.
UNAVAILABLE = ("kernels",)
def _test_requirements() -> tuple[str, ...]:
    """What ``[test]`` in setup.cfg adds, for the sessions that install the package with --no-deps."""
    parser = configparser.ConfigParser()
    parser.read("setup.cfg")
    return tuple(line.strip() for line in parser["options.extras_require"]["test"].splitlines() if line.strip())


TEST_REQUIREMENTS = _test_requirements()

#: (peft, transformers) pairs of the PEFT integration sessions (docs/peft.md), one
#: ``requirements/peft-P-transformers-T.txt`` each.
PEFT_PAIRS = [("0.21.2", "5.24.0"), ("0.21.2", "4.57.6")]
PEFT_IDS = [f"{peft_pin}-{transformers_pin}" for peft_pin, transformers_pin in PEFT_PAIRS]
PEFT_SESSIONS = [f"peft({pair})" for pair in PEFT_IDS]

nox.options.sessions = [f"tests({pin})" for pin in PINS] + PEFT_SESSIONS
nox.options.reuse_existing_virtualenvs = True
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       # 5.25+ from_pretrained turns hub kernels on by default and raises without the kernels
       # package (see NO_DEPS); this is transformers' own switch to leave them off.
       "USE_HUB_KERNELS": "NO"}
#: Prints transformers' own requirements, less extras and UNAVAILABLE, one per line.
_REQUIRES = (
    "import importlib.metadata as m, re; print('\\n'.join(r for r in (m.requires('transformers') or []) "
    "if 'extra ==' not in r and re.split(r'[<>=!~;\\[ ]', r)[0].lower() not in " + repr(UNAVAILABLE) + "))"
)
#: The benchmarks' --quick smoke test, the compiled-generate() graph-break count and the compiled
#: prefix on every relative run once, in the README's test command (5.24.0); repeating their minutes
#: in every session would not test the patch any further (tests/test_compile.py's forward count and
#: tests/test_compile_prefix.py's compiled BART prefix run everywhere; the relatives' compiled prefix
#: was run on each 5.x pin by hand: docs/how-it-works.md).
PYTEST = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore=tests/test_benchmarks_quick.py",
          "--ignore=tests/test_compile_generate.py", "--ignore=tests/test_compile_family.py")


@nox.session(name="tests")
@nox.parametrize("pin", list(PINS), ids=list(PINS))
def tests(session: nox.Session, pin: str) -> None:
    """The whole suite against one pinned transformers release."""
    # The pin file goes in as a constraint too, so `-e .` cannot move it.
    requirement = f"requirements/transformers-{pin}.txt"
    if pin in NO_DEPS:
        _install_without_deps(session, pin)
    else:
        session.install("-c", "constraints-matrix.txt", "-c", requirement, "-r", requirement, "-e", ".[test]")
    session.run("python", "-m", "bart_prefix_patch", "doctor", env=ENV)
    session.run(*PYTEST, *session.posargs, env=ENV)


@nox.session(name="peft")
@nox.parametrize("pair", PEFT_IDS, ids=PEFT_IDS)
def peft_matrix(session: nox.Session, pair: str) -> None:
    """The whole suite (tests/test_peft.py included) with peft installed, for one (peft, transformers) pair.

    Less tests/test_compile_prefix.py: its transformers pins run it in their own sessions, and
    peft plays no part in it (a PeftModel's calls run eagerly under torch.compile, docs/peft.md).
    """
    peft_pin, transformers_pin = pair.split("-")
    requirement = f"requirements/peft-{peft_pin}-transformers-{transformers_pin}.txt"
    session.install("-c", "constraints-matrix.txt", "-c", requirement, "-r", requirement, "-e", ".[test,peft]")
    session.run("python", "-m", "bart_prefix_patch", "doctor", env=ENV)
    session.run(*PYTEST, "--ignore=tests/test_compile_prefix.py", *session.posargs, env=ENV)


def _install_without_deps(session: nox.Session, version: str) -> None:
    """transformers==version with --no-deps, then its other requirements, then this package (see NO_DEPS)."""
    session.install("-c", "constraints-matrix.txt", "torch", "wrapt", *TEST_REQUIREMENTS)
    session.install("--no-deps", f"transformers=={version}")
    requires = session.run("python", "-c", _REQUIRES, silent=True) or ""
    session.install("-c", "constraints-matrix.txt", *[line.strip() for line in requires.splitlines() if line.strip()])
    session.install("--no-deps", "-e", ".")


def _newest_transformers(session: nox.Session) -> str:
    """The newest final release the package index lists (``pip install --upgrade`` stops short of it
    when its requirements cannot be met, as 5.25.0's kernels cannot here)."""
    listed = session.run("python", "-m", "pip", "index", "versions", "transformers", silent=True) or ""
    found = re.search(r"Available versions:\s*(.+)", listed)
    finals = [v.strip() for v in (found.group(1).split(",") if found else []) if re.fullmatch(r"\d+(\.\d+)*", v.strip())]
    if not finals:
        raise CommandFailed(f"pip index versions transformers listed nothing:\n{listed}")
    return max(finals, key=lambda v: tuple(int(part) for part in v.split(".")))


_PROBE = """
import warnings
warnings.simplefilter("ignore")
import transformers, bart_prefix_patch as bpp
gate = bpp.gate()
print("tested transformers", transformers.__version__)
print("in the fingerprint table:", f"yes (family {gate.family})" if gate.in_table
      else "no (differing: " + (", ".join(gate.mismatched) or "none") + ")")
result = gate.selfcheck
print("self-check:", "not needed (the table knows this release)" if gate.in_table
      else f"passed ({result.summary()})" if result is not None and result.passed
      else "FAILED: " + (result.summary() if result is not None else gate.message))
"""


@nox.session
def latest(session: nox.Session) -> None:
    """Newest transformers on the index: is it in the table, did the self-check pass, the test summary.

    Non-blocking: the report is printed and the session succeeds whatever it finds. A release the
    table does not know is tested with BART_PREFIX_PATCH_UNKNOWN=verify, i.e. as accepted (or
    refused) by the behavioural self-check.
    """
    report = []
    try:
        version = _newest_transformers(session)
        report.append(f"newest transformers on the index: {version}")
        _install_without_deps(session, version)
        env = {**ENV, "BART_PREFIX_PATCH_UNKNOWN": "verify"}
        probe = session.run("python", "-c", _PROBE, env=env, silent=True, success_codes=range(256)) or ""
        report += [line for line in probe.splitlines()
                   if line.startswith(("tested transformers", "in the fingerprint table", "self-check"))]
        if version in PINS:  # the matrix already ran the suite on it: don't spend CI minutes twice
            report.append(f"tests: run by the matrix session tests({version})")
            session.log("latest report:\n  " + "\n  ".join(report))
            return
        if "in the fingerprint table: yes" in probe:
            env = ENV  # a known release runs as users get it
        tests = session.run(*PYTEST, *session.posargs, env=env, silent=True, success_codes=range(256)) or ""
        lines = [line for line in tests.splitlines() if line.strip()]
        print("\n".join(lines[-40:]))  # failures (-ra) and the summary line
        report.append("tests: " + (lines[-1].strip("= ") if lines else "no output"))
    except CommandFailed as error:  # never fail CI: report what broke
        report.append(f"latest: could not complete ({error})")
    session.log("latest report:\n  " + "\n  ".join(report))
