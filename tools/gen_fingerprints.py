"""Generate ``bart_prefix_patch/_fingerprint_table.json`` from released wheels.

For every final transformers release in the supported range, download the
wheel (never install it), fingerprint each function in ``FINGERPRINTED`` with
the very ``fingerprint_source`` the runtime gate uses, and write a
deduplicated table: releases -> fingerprint set id -> {family, fingerprints}.

Usage:
    python tools/gen_fingerprints.py --add 5.25.0       # one new release: hash, assign family, update table
    python tools/gen_fingerprints.py                    # whole range, write table
    python tools/gen_fingerprints.py --versions 5.24.0  # restrict releases
    python tools/gen_fingerprints.py --check            # exit 1 if table is stale

``--add`` merges one release into the checked-in table. Its family is the
matching set's when its fingerprints equal a known set; else the family of
the newest release whose ``modeling_bart`` functions hash the same (only
shared helpers changed); else it is only proposed, from the shape of
``BartAttention.forward``, and written when confirmed with ``--family``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import time
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOW, HIGH = (4, 44, 0), (5, 26)  # supported range: LOW <= v < HIGH

try:
    from packaging.version import Version
except ImportError:  # keep the tool usable without packaging; finals are plain dotted ints
    Version = None


def _load(name: str):
    """Load a stdlib-only package module by path: importing the package would patch transformers."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bart_prefix_patch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


FP = _load("_fingerprint")
ARCH = _load("_architectures")
#: What the gate fingerprints: every row of the architecture table plus the shared upstream code.
FINGERPRINTED = ARCH.fingerprinted()


def vkey(version: str) -> tuple[int, ...]:
    """Numeric sort key of a final release (``5.10.1`` sorts after ``5.2.0``)."""
    return Version(version).release if Version else tuple(int(p) for p in version.split("."))


def is_final(version: str) -> bool:
    """True for releases without pre/dev/post/local parts (rc, dev and the like are excluded)."""
    if Version is None:
        return re.fullmatch(r"\d+(\.\d+)*", version) is not None
    try:
        v = Version(version)
    except ValueError:
        return False
    return not (v.is_prerelease or v.is_devrelease or v.is_postrelease or v.local)


def available_versions() -> list[str]:
    """All transformers versions PyPI knows, yanked ones included, via pip (the only reachable service).

    ``pip index versions`` hides yanked releases (4.46.0, 4.52.0, 4.57.0, 5.10.0), which users may
    still have pinned; pip's resolver error lists them. Taking the union also survives either
    command failing (``pip index`` is experimental).
    """
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    index = subprocess.run(pip + ["index", "versions", "transformers"], capture_output=True, text=True)
    resolver = subprocess.run(pip + ["download", "--no-deps", "-d", "/tmp", "transformers==0.0.0"],
                              capture_output=True, text=True)
    found = re.findall(r"Available versions:\s*(.+)", index.stdout)
    found += re.findall(r"\(from versions:\s*([^)]*)\)", resolver.stderr)
    if not found:
        sys.exit("could not list transformers versions from PyPI:\n" + index.stderr + resolver.stderr)
    return sorted({v.strip() for line in found for v in line.split(",") if v.strip()})


def family_by_version(version: str) -> str:
    """Family from the project notes (E' is spelled E2 to keep JSON keys plain)."""
    v = vkey(version)[:2]
    for family, lo, hi in (("A1", (4, 36), (4, 46)), ("A2", (4, 46), (4, 52)), ("B", (4, 52), (4, 53)),
                           ("C", (4, 53), (4, 58)), ("D", (5, 0), (5, 4)), ("E", (5, 4), (5, 24)),
                           ("E2", (5, 24), (5, 26))):
        if lo <= v < hi:
            return family
    raise ValueError(f"no family for transformers {version}")


def family_by_code(bart_source: str | None) -> str | None:
    """Family of a 5.x release read off BartAttention.forward, or None if not decidable.

    E2 renamed ``past_key_values`` to ``cache`` (with a deprecate_kwarg shim); D
    still takes ``cache_position``, which E dropped.
    """
    if bart_source is None:
        return None
    node = FP._find(ast.parse(bart_source), "BartAttention.forward")
    if node is None:
        return None
    for dec in node.decorator_list:
        if (isinstance(dec, ast.Call) and getattr(dec.func, "id", getattr(dec.func, "attr", "")) == "deprecate_kwarg"
                and dec.args and getattr(dec.args[0], "value", None) == "past_key_values"
                and any(k.arg == "new_name" and getattr(k.value, "value", None) == "cache" for k in dec.keywords)):
            return "E2"
    names = {a.arg for a in node.args.args + node.args.kwonlyargs}
    return "D" if "cache_position" in names else "E"


def fetch_wheel(version: str, cache: Path) -> Path:
    """Download the release's wheel into ``cache`` unless it is already there."""
    found = sorted(cache.glob(f"transformers-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "-q",
                        "--no-deps", "--no-binary", ":none:", "--only-binary", ":all:",
                        f"transformers=={version}", "-d", str(cache)], check=True, capture_output=True)
        found = sorted(cache.glob(f"transformers-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip produced no wheel for transformers {version}")
    return found[0]


def fingerprint_wheel(wheel: Path) -> tuple[dict[str, str], str | None]:
    """Fingerprints of every FINGERPRINTED function in the wheel, plus the BART module source."""
    result, bart = {}, None
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        for module, names in FINGERPRINTED.items():
            path = module.replace(".", "/") + ".py"
            source = zf.read(path).decode("utf-8") if path in members else None
            bart = source if module == ARCH.ARCHITECTURES["bart"].module else bart
            for name in names:
                result[f"{module}:{name}"] = "missing" if source is None else FP.fingerprint_source(source, name)
    return result, bart


def set_id(fingerprints: dict[str, str]) -> str:
    """Content address of a fingerprint set, so identical releases share one entry."""
    canonical = json.dumps(fingerprints, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def process(version: str, cache: Path) -> tuple[str, dict[str, str], str]:
    """Download, fingerprint and classify one release (checking the notes against the code)."""
    fingerprints, bart = fingerprint_wheel(fetch_wheel(version, cache))
    family = family_by_version(version)
    if family in ("D", "E", "E2"):
        code = family_by_code(bart)
        if code is not None and code != family:
            print(f"WARNING: transformers {version}: notes say family {family}, but BartAttention.forward "
                  f"looks like {code}; following the code", flush=True)
            family = code
    return version, fingerprints, family


def build_table(versions: list[str], cache: Path) -> dict:
    """Fingerprint all releases in parallel (download-bound) and deduplicate into the table layout."""
    cache.mkdir(parents=True, exist_ok=True)
    # Processes, not threads: downloads overlap, and the GIL-bound AST parsing can use several cores.
    with ProcessPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(partial(process, cache=cache), versions))
    sets, releases = {}, {}
    for version, fingerprints, family in sorted(results, key=lambda r: vkey(r[0])):
        sid = set_id(fingerprints)
        if sid in sets and sets[sid]["family"] != family:
            # Same code under two family names means the boundaries are wrong.
            raise SystemExit(f"ERROR: transformers {version} ({family}) has the same fingerprints as a "
                             f"{sets[sid]['family']} release (set {sid}); fix the family boundaries")
        sets[sid] = {"family": family, "fingerprints": dict(sorted(fingerprints.items()))}
        releases[version] = sid
    keys = sorted(f"{m}:{n}" for m, names in FINGERPRINTED.items() for n in names)
    # Explicit ordering instead of sort_keys, so releases read in version order rather than 5.10 < 5.2.
    return {"generated_by": "tools/gen_fingerprints.py", "keys": keys,
            "releases": releases, "sets": dict(sorted(sets.items()))}


def _write(table: dict, path: Path) -> None:
    # One value per line, so table diffs stay readable.
    path.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")


def add_release(version: str, out: Path, cache: Path, family: str | None = None) -> int:
    """Fingerprint one release and merge it into the table at ``out``; the exit code.

    0: added (or already there); 2: the family could not be assigned and was
    only proposed (rerun with ``--family``); 1: the table does not fit.
    """
    table = json.loads(out.read_text(encoding="utf-8"))
    keys = sorted(f"{m}:{n}" for m, names in FINGERPRINTED.items() for n in names)
    if table["keys"] != keys:
        print("FINGERPRINTED changed since the table was generated: regenerate it whole "
              "(python tools/gen_fingerprints.py)")
        return 1
    cache.mkdir(parents=True, exist_ok=True)
    print(f"transformers {version}: downloading the wheel (pip download --no-deps) ...", flush=True)
    fingerprints, bart = fingerprint_wheel(fetch_wheel(version, cache))
    fingerprints = dict(sorted(fingerprints.items()))
    sid = set_id(fingerprints)
    by_release = sorted(table["releases"].items(), key=lambda item: vkey(item[0]))
    if sid in table["sets"]:
        known = table["sets"][sid]["family"]
        if family and family != known:
            print(f"ERROR: {version} has the fingerprints of set {sid} (family {known}), not {family}")
            return 1
        family, reason = known, f"its fingerprints equal set {sid}"
    else:
        newest = next(((r, s) for r, s in reversed(by_release)), None)
        if newest:
            old = table["sets"][newest[1]]["fingerprints"]
            changed = [k for k in keys if old.get(k) != fingerprints[k]]
            print(f"differs from {newest[0]} in: " + (", ".join(changed) or "nothing"))
        models = {row.module for row in ARCH.ARCHITECTURES.values()}
        same_models = [(r, s) for r, s in reversed(by_release)
                       if all(table["sets"][s]["fingerprints"][k] == fingerprints[k] for k in keys
                              if k.split(":")[0] in models)]
        code = family_by_code(bart)
        if family:
            reason = "given with --family"
        elif same_models:
            release, other = same_models[0]
            family = table["sets"][other]["family"]
            reason = f"every model's functions hash as in {release} (family {family}); only shared helpers changed"
        else:
            print(f"PROPOSED family: {code or '(none: BartAttention.forward has an unknown shape)'} "
                  "(read off BartAttention.forward). A model's code changed: diff it against the previous release "
                  "(docs/adding-a-transformers-version.md), then confirm with "
                  f"--add {version} --family {code or 'NAME'}")
            return 2
    table["releases"][version] = sid
    table["releases"] = dict(sorted(table["releases"].items(), key=lambda item: vkey(item[0])))
    table["sets"][sid] = {"family": family, "fingerprints": fingerprints}
    table["sets"] = dict(sorted(table["sets"].items()))
    _write(table, out)
    print(f"transformers {version}: family {family} ({reason}); set {sid}; wrote {out}")
    print("next: requirements/transformers-X.txt + PINS in noxfile.py, nox -s \"tests(X)\", then widen "
          "SUPPORTED_RANGE (_compat.py), LOW/HIGH here and the docs")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", metavar="VERSION", help="fingerprint one new release and merge it into the table")
    parser.add_argument("--family", help="with --add: the family to record when it can only be proposed")
    parser.add_argument("--versions", nargs="+", help="only these releases (default: all finals in range)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bart_prefix_patch_wheels"), help="wheel dir")
    parser.add_argument("--out", type=Path, default=ROOT / "bart_prefix_patch" / "_fingerprint_table.json")
    parser.add_argument("--check", action="store_true", help="exit non-zero if the table at --out is stale")
    args = parser.parse_args()
    if args.add:
        return add_release(args.add, args.out, args.cache, args.family)
    start = time.monotonic()
    versions = args.versions or [v for v in available_versions()
                                 if is_final(v) and LOW <= vkey(v) and vkey(v)[:2] < HIGH]
    versions = sorted(set(versions), key=vkey)
    print(f"{len(versions)} releases: {versions[0]} .. {versions[-1]}", flush=True)
    table = build_table(versions, args.cache)
    families = Counter(s["family"] for s in table["sets"].values())
    print("distinct fingerprint sets per family:", dict(sorted(families.items())))
    text = json.dumps(table, indent=1) + "\n"  # as _write(): one value per line
    if args.check:
        current = args.out.read_text(encoding="utf-8")
        if args.versions:  # a restricted check can only compare the requested releases' sets
            old = json.loads(current)
            stale = [v for v in versions
                     if old["sets"].get(old["releases"].get(v)) != table["sets"][table["releases"][v]]]
        else:  # byte-for-byte, so a hand edit or reordering is caught too
            stale = [] if current == text else ["the whole table"]
        print(f"check {'FAILED for ' + ', '.join(stale) if stale else 'passed'} "
              f"({time.monotonic() - start:.0f}s)")
        return 1 if stale else 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({time.monotonic() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
