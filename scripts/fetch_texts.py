#!/usr/bin/env python3
"""Rebuild the bundled text corpus in ``src/tca/data/texts/``.

This script documents, and reproduces, how the committed texts were obtained.  It is
**not** needed at run time: the cleaned texts, ``MANIFEST.json`` and ``LICENSES.md`` are
committed to the repository and shipped inside the wheel.

Every text comes from a package in an ordinary package registry (Debian's archive or
PyPI), fetched by name with the ordinary client:

* ``apt-get download r-cran-janeaustenr``   -> *Pride and Prejudice* (Jane Austen)
* ``apt-get download r-cran-tokenizers``    -> *Moby-Dick* (Herman Melville)
* ``apt-get download r-cran-tidytext``      -> *The War of the Worlds* (H. G. Wells),
  *Great Expectations* (Charles Dickens)
* ``pip download --no-deps --no-binary :all: brotli==1.2.1``
  -> *Alice's Adventures in Wonderland* (Lewis Carroll), ``tests/testdata/alice29.txt``
  (the Canterbury-corpus copy of Project Gutenberg's "Millennium Fulcrum Edition 2.9")
* ``apt-get download python3.11-doc``       -> the Python Tutorial (reStructuredText sources)
* ``apt-get download libpython3.11-stdlib`` -> ``_pyio.py`` (CPython source) and the PSF
  licence text

The R packages store their texts as R "lazy-load" databases (``data/Rdata.rdb``/``.rdx``) or
``.rda`` files; a small reader for R's XDR serialisation format is included below, so R itself
is not needed.  ``.deb`` archives are unpacked in pure Python (``ar`` + ``tarfile``).

Usage::

    python scripts/fetch_texts.py                 # download, clean, write src/tca/data/texts/
    python scripts/fetch_texts.py --check         # rebuild in a temp dir and compare sha256s
    python scripts/fetch_texts.py --cache DIR     # keep / reuse downloaded archives in DIR

Needs: Debian/Ubuntu with ``apt-get`` (run ``apt-get update`` first) and ``pip``.
Package versions used for the committed files are recorded in MANIFEST.json; if the archive
has moved on, the cleaned text may differ slightly (``--check`` reports this).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "tca" / "data" / "texts"

# Upper bound for one prose file (bytes, UTF-8).  Longer novels are cut at the last chapter
# heading that fits, so every file ends at a chapter boundary.
PROSE_MAX_BYTES = 390_000
MIN_CHARS = 60_000

PG_LICENCE = (
    "Public domain in the USA (Project Gutenberg eBook #{n}); the author died more than "
    "70 years ago, so also public domain in most other countries. Project Gutenberg header, "
    "footer, licence and all references to Project Gutenberg removed."
)

# --------------------------------------------------------------------------------------------
# Fetching and unpacking
# --------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)


def apt_download(name: str, cache: Path) -> tuple[Path, str]:
    """``apt-get download NAME`` into *cache* (reused if present); returns (deb, version)."""
    found = sorted(cache.glob(f"{name}_*.deb"))
    if not found:
        _run(["apt-get", "download", name], cwd=cache)
        found = sorted(cache.glob(f"{name}_*.deb"))
    deb = found[-1]
    version = deb.name.split("_")[1].replace("%3a", ":")
    return deb, version


def pip_download(spec: str, cache: Path) -> Path:
    name = spec.split("==")[0]
    found = sorted(cache.glob(f"{name}-*.tar.gz"))
    if not found:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(cache),
                spec,
            ],
            cwd=cache,
        )
        found = sorted(cache.glob(f"{name}-*.tar.gz"))
    return found[-1]


def deb_member(deb: Path, member: str) -> bytes:
    """Read one file (path as installed, e.g. ``/usr/lib/...``) out of a .deb, in pure Python."""
    data = deb.read_bytes()
    assert data[:8] == b"!<arch>\n", f"{deb} is not an ar archive"
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):  # not used by Debian bookworm; fall back to the system tool
            out = subprocess.run(
                ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
            ).stdout
            body, name = out, "data.tar"
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            f = tar.extractfile("." + member)
            assert f is not None, f"{member} not found in {deb}"
            return f.read()
    raise FileNotFoundError(f"no data.tar in {deb}")


def sdist_member(sdist: Path, member: str) -> bytes:
    with tarfile.open(sdist, "r:gz") as tar:
        f = tar.extractfile(member)
        assert f is not None, f"{member} not found in {sdist}"
        return f.read()


# --------------------------------------------------------------------------------------------
# A minimal reader for R's XDR serialisation (enough for character vectors and data frames)
# --------------------------------------------------------------------------------------------


class _RReader:
    def __init__(self, buf: bytes):
        self.b, self.p, self.refs = buf, 0, []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def raw(self, n: int) -> bytes:
        v = self.b[self.p : self.p + n]
        self.p += n
        return v

    def header(self) -> None:
        assert self.raw(2) == b"X\n", "only R's XDR serialisation format is supported"
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            self.raw(self.int())  # native encoding name

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL and special environments
            return None
        if t == 255:  # reference to an earlier symbol/environment
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            s = ("sym", self.item())
            self.refs.append(s)
            return s
        if t in (249, 248):  # namespace / package reference
            self.int()
            s = ("ns", [self.item() for _ in range(self.int())])
            self.refs.append(s)
            return s
        if t == 4:  # ENVSXP
            self.int()
            env: dict = {}
            self.refs.append(env)
            for _ in range(4):  # enclosure, frame, hashtab, attributes
                self.item()
            return env
        if t in (2, 3, 5, 6, 239, 240):  # pairlists, closures, promises, calls
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag[1] if tag else None, car)] + (cdr if isinstance(cdr, list) else [])
        if t == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.raw(n).decode("utf-8", "replace")
        if t == 238:  # ALTREP: class info, state, attributes
            return ("altrep", self.item(), self.item(), self.item())
        if t in (10, 13):  # logical, integer
            n = self.int()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # double
            n = self.int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19, 20):  # character vector, list, expression
            v = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            return ("attr", v, dict(self.item()))
        return v


def r_unserialize(buf: bytes):
    r = _RReader(buf)
    r.header()
    return r.item()


def r_lazyload(rdb: bytes, rdx: bytes) -> dict:
    """Objects of an R lazy-load database (a package's ``data/Rdata.rdb`` + ``.rdx``)."""
    if rdx[:2] == b"\x1f\x8b":
        rdx = gzip.decompress(rdx)
    elif rdx[:2] != b"X\n":
        rdx = zlib.decompress(rdx[4:])
    _, index, index_attrs = r_unserialize(rdx)
    variables = index[index_attrs["names"].index("variables")]
    _, offsets, var_attrs = variables

    def blob(off: int, length: int) -> bytes:
        chunk = rdb[off : off + length]
        kind = chunk[4:5]
        if kind == b"Z":
            return zlib.decompress(chunk[5:])
        if kind == b"X":
            return lzma.decompress(chunk[5:])
        if kind == b"2":
            return bz2.decompress(chunk[5:])
        if kind == b"0":
            return chunk[5:]
        return zlib.decompress(chunk[4:])

    return {name: r_unserialize(blob(*loc)) for name, loc in zip(var_attrs["names"], offsets, strict=True)}


def r_rda(buf: bytes) -> dict:
    """Objects of an ``.rda`` file (as written by ``save()``)."""
    if buf[:2] == b"\x1f\x8b":
        buf = gzip.decompress(buf)
    elif buf[:3] == b"\xfd7z":
        buf = lzma.decompress(buf)
    assert buf[:5] == b"RDX2\n" or buf[:5] == b"RDX3\n", "not an .rda file"
    return dict(r_unserialize(buf[5:]))


def tidytext_book(rda: dict, gutenberg_id: int) -> list[str]:
    """Lines of one book from tidytext's ``extdata/books.rda`` data frame."""
    _, cols, attrs = rda["books"]
    names = attrs["names"]
    ids, text = cols[names.index("gutenberg_id")], cols[names.index("text")]
    return [t or "" for g, t in zip(ids, text, strict=True) if g == gutenberg_id]


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

_CHAPTER = re.compile(r"^(CHAPTER|Chapter|BOOK)\b")


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg header/footer if present (START/END markers)."""
    m = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M)
    if m:
        text = text[m.end() :]
    m = re.search(
        r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", text, re.M | re.I
    )
    if m:
        text = text[: m.start()]
    return text


def clean_prose(text: str) -> str:
    """Plain running text: one paragraph per line, paragraphs separated by a blank line."""
    text = unicodedata.normalize("NFC", text.replace("\ufeff", ""))
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = "".join(c for c in text if c == "\n" or unicodedata.category(c) != "Cc")  # e.g. ^Z
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        para = " ".join(lines)
        if "gutenberg" in para.lower():  # editor's notes, credits, licence remnants
            continue
        para = re.sub(r"(?<![\w_])_([^_\n]+?)_(?![\w_])", r"\1", para)  # _italics_
        para = para.replace("`", "'")  # old-style `opening quotes'
        para = re.sub(r" {2,}", " ", para).strip()
        if para:
            paragraphs.append(para)
    return "\n\n".join(paragraphs) + "\n"


def truncate_at_chapter(text: str, max_bytes: int) -> str:
    """Cut before the last chapter heading that keeps the text within *max_bytes*."""
    if len(text.encode()) <= max_bytes:
        return text
    paras = text.split("\n\n")
    size, cut, last_heading = 0, 0, None
    for i, p in enumerate(paras):
        if _CHAPTER.match(p) and len(p) < 80 and i > 0:
            last_heading = i
        size += len(p.encode()) + 2
        if size > max_bytes:
            cut = i
            break
    keep = last_heading if last_heading else cut
    return "\n\n".join(paras[:keep]).rstrip() + "\n"


def clean_text_file(text: str) -> str:
    """Code / docs: keep content verbatim; only normalise newlines and strip trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(ln.rstrip() for ln in text.split("\n")).strip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------

TUTORIAL_ORDER = [
    "appetite",
    "interpreter",
    "introduction",
    "controlflow",
    "datastructures",
    "modules",
    "inputoutput",
    "errors",
    "classes",
    "stdlib",
    "stdlib2",
    "venv",
    "whatnow",
    "interactive",
    "floatingpoint",
    "appendix",
]
PYDOC = "/usr/share/doc/python3.11/html/_sources/tutorial/{}.rst.txt"
RLIB = "/usr/lib/R/site-library"


def build(cache: Path) -> list[tuple[dict, str]]:
    out: list[tuple[dict, str]] = []

    # 1. Pride and Prejudice -- calibration text
    deb, ver = apt_download("r-cran-janeaustenr", cache)
    austen = r_lazyload(
        deb_member(deb, f"{RLIB}/janeaustenr/data/Rdata.rdb"),
        deb_member(deb, f"{RLIB}/janeaustenr/data/Rdata.rdx"),
    )
    text = truncate_at_chapter(clean_prose("\n".join(austen["prideprejudice"])), PROSE_MAX_BYTES)
    out.append(
        (
            {
                "file": "austen_pride_and_prejudice.txt",
                "title": "Pride and Prejudice",
                "author": "Jane Austen",
                "year": 1813,
                "kind": "prose",
                "role": "calibration",
                "excerpt": "opening chapters (cut at a chapter boundary)",
                "source": f"Debian package r-cran-janeaustenr {ver}, R dataset `prideprejudice` in "
                f"{RLIB}/janeaustenr/data/Rdata.rdb; originally Project Gutenberg eBook #1342",
                "licence": PG_LICENCE.format(n=1342) + " Packaging (janeaustenr R package) is MIT.",
            },
            text,
        )
    )

    # 2. Moby-Dick
    deb, ver = apt_download("r-cran-tokenizers", cache)
    tok = r_lazyload(
        deb_member(deb, f"{RLIB}/tokenizers/data/Rdata.rdb"),
        deb_member(deb, f"{RLIB}/tokenizers/data/Rdata.rdx"),
    )
    moby = tok["mobydick"]
    moby = (moby[1] if isinstance(moby, tuple) else moby)[0]
    moby = strip_gutenberg(moby)
    moby = moby[moby.index("CHAPTER 1. Loomings") :]  # skip transcriber's notes + extracts
    text = clean_prose("MOBY-DICK; OR, THE WHALE\n\nBy Herman Melville\n\n" + moby)
    text = truncate_at_chapter(text, PROSE_MAX_BYTES)
    out.append(
        (
            {
                "file": "melville_moby_dick.txt",
                "title": "Moby-Dick; or, The Whale",
                "author": "Herman Melville",
                "year": 1851,
                "kind": "prose",
                "role": "evaluation",
                "excerpt": "from chapter 1 (etymology and extracts omitted), cut at a chapter boundary",
                "source": f"Debian package r-cran-tokenizers {ver}, R dataset `mobydick` in "
                f"{RLIB}/tokenizers/data/Rdata.rdb; originally Project Gutenberg eBook #2701",
                "licence": PG_LICENCE.format(n=2701) + " Packaging (tokenizers R package) is MIT.",
            },
            text,
        )
    )

    # 3 + 4. The War of the Worlds, Great Expectations
    deb, ver = apt_download("r-cran-tidytext", cache)
    books = r_rda(deb_member(deb, f"{RLIB}/tidytext/extdata/books.rda"))
    for gid, fname, title, author, year in [
        (36, "wells_war_of_the_worlds.txt", "The War of the Worlds", "H. G. Wells", 1898),
        (1400, "dickens_great_expectations.txt", "Great Expectations", "Charles Dickens", 1861),
    ]:
        full = clean_prose("\n".join(tidytext_book(books, gid)))
        text = truncate_at_chapter(full, PROSE_MAX_BYTES)
        out.append(
            (
                {
                    "file": fname,
                    "title": title,
                    "author": author,
                    "year": year,
                    "kind": "prose",
                    "role": "evaluation",
                    "excerpt": "complete" if text == full else "opening chapters (cut at a chapter boundary)",
                    "source": f"Debian package r-cran-tidytext {ver}, data frame `books` in "
                    f"{RLIB}/tidytext/extdata/books.rda (gutenberg_id {gid}); "
                    f"originally Project Gutenberg eBook #{gid}",
                    "licence": PG_LICENCE.format(n=gid) + " Packaging (tidytext R package) is MIT.",
                },
                text,
            )
        )

    # 5. Alice's Adventures in Wonderland
    sdist = pip_download("brotli==1.2.1", cache)
    raw = sdist_member(sdist, f"{sdist.name[:-7]}/tests/testdata/alice29.txt").decode("latin-1")
    text = clean_prose(raw)
    out.append(
        (
            {
                "file": "carroll_alice_in_wonderland.txt",
                "title": "Alice's Adventures in Wonderland",
                "author": "Lewis Carroll",
                "year": 1865,
                "kind": "prose",
                "role": "evaluation",
                "excerpt": "complete (Millennium Fulcrum Edition 2.9)",
                "source": f"PyPI sdist {sdist.name}, tests/testdata/alice29.txt (Canterbury corpus); "
                "originally Project Gutenberg eBook #11",
                "licence": PG_LICENCE.format(n=11) + " Packaging (brotli) is MIT.",
            },
            text,
        )
    )

    # 6. Python tutorial (docs) and 7. CPython _pyio.py (code)
    deb, ver = apt_download("python3.11-doc", cache)
    parts = [deb_member(deb, PYDOC.format(p)).decode() for p in TUTORIAL_ORDER]
    text = clean_text_file("\n\n".join(parts))
    out.append(
        (
            {
                "file": "python_tutorial.rst.txt",
                "title": "The Python Tutorial (Python 3.11)",
                "author": "Python Software Foundation and contributors",
                "year": 2023,
                "kind": "docs",
                "role": "evaluation",
                "excerpt": "complete tutorial, reStructuredText sources concatenated",
                "source": f"Debian package python3.11-doc {ver}, "
                f"{PYDOC.format('*')} ({len(TUTORIAL_ORDER)} chapters in tutorial order)",
                "licence": "PSF License Agreement for Python 3.11 (see PSF-LICENSE.txt); code examples "
                "additionally under the Zero-Clause BSD licence. Copyright (c) 2001-2023 "
                "Python Software Foundation; All Rights Reserved.",
            },
            text,
        )
    )

    deb, ver = apt_download("libpython3.11-stdlib", cache)
    text = clean_text_file(deb_member(deb, "/usr/lib/python3.11/_pyio.py").decode())
    out.append(
        (
            {
                "file": "cpython_pyio.py.txt",
                "title": "_pyio.py: pure-Python implementation of the io module",
                "author": "Python Software Foundation and contributors",
                "year": 2023,
                "kind": "code",
                "role": "evaluation",
                "excerpt": "complete module",
                "source": f"Debian package libpython3.11-stdlib {ver}, /usr/lib/python3.11/_pyio.py",
                "licence": "PSF License Agreement for Python 3.11 (see PSF-LICENSE.txt). "
                "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.",
            },
            text,
        )
    )
    psf = deb_member(deb, "/usr/lib/python3.11/LICENSE.txt").decode()
    out.append(({"file": "PSF-LICENSE.txt", "_aux": True}, clean_text_file(psf)))
    return out


LICENSES_MD = """\
# Licences of the bundled texts

The files in this directory are real natural-language (and code/documentation) texts bundled
with `tca-attention` so that calibration and evaluation work offline.  They were fetched from
Debian and PyPI packages and cleaned by `scripts/fetch_texts.py`; `MANIFEST.json` records the
exact package, path, character count and SHA-256 of every file.

## Public-domain literature (kind `prose`)

{prose}

All five are transcriptions first published by Project Gutenberg.  The works themselves are in
the public domain in the United States (published before 1929) and, their authors having died
more than 70 years ago (Austen 1817, Melville 1891, Dickens 1870, Carroll 1898, Wells 1946), in
the public domain in most other countries as well.  The Project Gutenberg licence governs only
copies that carry the Project Gutenberg name and trademark; these files have the Project
Gutenberg header, footer, licence text and every mention of Project Gutenberg removed, which
that licence expressly permits, so they are plain public-domain texts with no conditions of use.
The R and Python packages they were taken from (janeaustenr, tokenizers, tidytext: MIT;
brotli: MIT) claim no copyright in the texts; their MIT licences cover only their own code.

## Python documentation and source code (kinds `docs` and `code`)

{psf}

Both are covered by the **PSF License Agreement for Python 3.11**, a permissive licence
(OSI-approved, GPL-compatible) that allows copying, modification and redistribution provided
that the PSF licence and copyright notice ("Copyright (c) 2001-2023 Python Software Foundation;
All Rights Reserved") are retained.  The full licence text, taken from the same Debian package,
is in `PSF-LICENSE.txt` in this directory.  Code examples in the Python documentation are in
addition available under the Zero-Clause BSD licence.
"""


def write(out_dir: Path, items: list[tuple[dict, str]]) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for meta, text in items:
        data = text.encode("utf-8")
        (out_dir / meta["file"]).write_bytes(data)
        if meta.get("_aux"):
            continue
        if meta["kind"] == "prose":
            assert "gutenberg" not in text.lower(), meta["file"]
        assert len(text) >= MIN_CHARS, (meta["file"], len(text))
        entry = dict(meta)
        entry["chars"] = len(text)
        entry["bytes"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        manifest.append(entry)
        print(f"{meta['file']:36s} {len(text):8d} chars  {meta['role']}", file=sys.stderr)

    def line(e: dict) -> str:
        return (
            f"- `{e['file']}`: *{e['title']}* by {e['author']} ({e['year']}), {e['excerpt']}. "
            f"Role: {e['role']}. Source: {e['source']}."
        )

    prose = "\n".join(line(e) for e in manifest if e["kind"] == "prose")
    psf = "\n".join(line(e) for e in manifest if e["kind"] != "prose")
    (out_dir / "LICENSES.md").write_text(LICENSES_MD.format(prose=prose, psf=psf), encoding="utf-8")
    doc = {
        "description": "Bundled texts for calibration and evaluation; rebuilt by scripts/fetch_texts.py",
        "default_calibration": next(e["file"] for e in manifest if e["role"] == "calibration"),
        "files": manifest,
    }
    (out_dir / "MANIFEST.json").write_text(
        json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, help="directory for downloaded archives (kept)")
    ap.add_argument(
        "--check", action="store_true", help="rebuild into a temporary directory and compare with --out"
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tca-texts-"))
    try:
        cache = args.cache or tmp / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        items = build(cache.resolve())
        if not args.check:
            write(args.out, items)
            return 0
        fresh = write(tmp / "out", items)
        committed = json.loads((args.out / "MANIFEST.json").read_text())["files"]
        old = {e["file"]: e["sha256"] for e in committed}
        bad = [e["file"] for e in fresh if old.get(e["file"]) != e["sha256"]]
        print("all texts identical" if not bad else f"differ: {bad}", file=sys.stderr)
        return 1 if bad else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
