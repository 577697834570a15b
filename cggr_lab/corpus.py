"""A corpus big enough to decide routing-quality questions (docs/design.md §5), built offline from Debian packages.

Stages (``python -m cggr_lab.corpus --help``):

1. ``fetch``: ``apt-get download`` the packages into ``<cache>/corpus/debs``
   (``<cache>`` is ``cggr.env.cache_dir()``). A package whose ``.deb`` is
   already there is not downloaded again; its version and sha256 are recorded.
2. ``extract``: the text files that ``SOURCES`` selects from each package, one
   file per document, into a text folder. The kernel tarball inside
   ``linux-source-6.1`` is read as a stream, never unpacked whole. Files over
   ``max_doc_bytes`` (generated register tables), files with NUL bytes, empty
   files and exact duplicates are skipped.
3. ``build``: the documents in a seeded random order, whole documents held out
   for validation, a byte-level BPE trained on a sample of the *training*
   documents (``cggr_lab.data.train_tokenizer``, cached) unless one is given, and
   the token streams ``train.bin`` and ``val.bin``: flat little-endian
   ``uint16`` (``uint32`` above 65536 entries) with ``EOT`` after every
   document, written chunk by chunk while the documents are read. Next to them:
   ``tokenizer.json`` and ``meta.json`` (counts, sources, versions, hashes).
4. ``pack``: one plain ``.tar`` of at most ``--max-mb`` holding ``meta.json``
   and, compressed with xz, the tokenizer, the validation stream whole and the
   longest prefix of whole training documents that fits (the training order is
   shuffled already, so a prefix is a random sample of documents). ``unpack``
   restores the folder and checks every sha256.

``all`` runs 1-3. ``MemmapBatches`` and ``memmap_eval_batches`` read a stream
through ``np.memmap``, never loading it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cggr import env
from cggr_lab.data import EOT, eot_id, train_tokenizer

FORMAT = "cggr-corpus-v1"
EXTRACT_FORMAT = "cggr-corpus-extract-v1"


@dataclass(frozen=True)
class Source:
    """Which files of a Debian package become documents.

    ``include`` must match the whole member path (``re.fullmatch``), relative
    to the package's root, or, when ``tarball`` is given, relative to the root
    of the first member matching ``tarball`` (a compressed tar inside the
    package) with the tar's top folder removed.
    """

    package: str
    include: str
    tarball: str | None = None


SOURCES: dict[str, Source] = {s.package: s for s in (
    # ~750 MB of C, headers, assembly, Kconfig and the kernel's reStructuredText documentation.
    Source("linux-source-6.1", r"(?:.*/)?(?:[^/]+\.(?:c|h|S|rst|txt)|Kconfig[^/]*)",
           tarball=r"usr/src/linux-source-[^/]+\.tar\.(?:xz|gz|bz2)"),
    # English prose: the Python 3.11 documentation (reStructuredText sources, ~11 MB) ...
    Source("python3.11-doc", r"usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt"),
    # ... Perl's manual pages (POD, ~9 MB) ...
    Source("perl-doc", r"usr/share/perl/[^/]+/pod/[^/]+\.pod"),
    # ... and git's manual (AsciiDoc, ~3 MB).
    Source("git-doc", r"usr/share/doc/git-doc/.+\.txt"),
)}
DEFAULT_PACKAGES = tuple(SOURCES)

MAX_DOC_BYTES = 256 * 1024
"""Larger files are skipped: in linux 6.1 the 264 files over 256 KiB are 434 MB, almost all generated
AMD register tables (``asic_reg/*_sh_mask.h``), which would be a third of the corpus."""


def corpus_cache() -> Path:
    """``cggr.env.cache_dir() / "corpus"``: the downloaded ``.deb`` files and the extracted text."""
    return env.cache_dir() / "corpus"


def _log(msg: str) -> None:
    print(f"[corpus {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --------------------------------------------------------------------------- 1. fetch

def fetch(packages: Sequence[str] = DEFAULT_PACKAGES, debs_dir: str | os.PathLike | None = None) -> list[dict]:
    """Download each package's ``.deb`` with ``apt-get download`` unless it is in ``debs_dir`` already.

    Returns one record per package: name, version, file name, size and sha256.
    """
    debs = Path(debs_dir) if debs_dir is not None else corpus_cache() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    unknown = [p for p in packages if p not in SOURCES]
    if unknown:
        raise ValueError(f"packages {unknown} have no extraction rule; known packages: {sorted(SOURCES)}")
    records = []
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            _log(f"apt-get download {pkg} into {debs}")
            try:
                subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
            except FileNotFoundError:
                raise RuntimeError("apt-get not found: fetch needs a Debian or Ubuntu machine "
                                   f"(or put {pkg}_*.deb into {debs} by hand)") from None
            except subprocess.CalledProcessError as e:
                raise RuntimeError(f"apt-get download {pkg} failed (exit {e.returncode}); "
                                   "run `apt-get update` first if the package is unknown") from None
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        if len(found) != 1:
            raise RuntimeError(f"expected one .deb of {pkg} in {debs}, found {[f.name for f in found]}; "
                               "delete the ones not to use")
        deb = found[0]
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        records.append({"package": pkg, "version": version, "file": deb.name, "bytes": deb.stat().st_size,
                        "sha256": _sha256_file(deb)})
    return records


# --------------------------------------------------------------------------- 2. extract

def _deb_members(deb: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """The members of a ``.deb``'s file system tree, streamed from ``dpkg-deb --fsys-tarfile``."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                yield member, tar
    finally:
        proc.stdout.close()
        if proc.wait() not in (0, -13):  # -13: SIGPIPE when the caller stops early
            raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed with exit {proc.returncode}")


def _source_files(deb: Path, source: Source) -> Iterator[tuple[str, Callable[[], bytes], int]]:
    """``(relative path, read, size)`` of the package's regular files that ``source.include`` selects."""
    include = re.compile(source.include)
    for member, tar in _deb_members(deb):
        name = member.name.removeprefix("./")
        if not member.isfile():
            continue
        if source.tarball is None:
            if include.fullmatch(name):
                yield name, tar.extractfile(member).read, member.size
        elif re.fullmatch(source.tarball, name):
            with tarfile.open(fileobj=tar.extractfile(member), mode="r|*") as inner:
                for m in inner:
                    rel = m.name.removeprefix("./").split("/", 1)[-1]  # drop the top folder
                    if m.isfile() and include.fullmatch(rel):
                        yield rel, inner.extractfile(m).read, m.size
            return


def extract(records: Sequence[dict], text_dir: str | os.PathLike | None = None,
            debs_dir: str | os.PathLike | None = None, max_doc_bytes: int = MAX_DOC_BYTES) -> dict:
    """The selected text files of the fetched packages into ``text_dir/<package>/<path>``, one per document.

    Text is decoded as UTF-8 (undecodable bytes replaced) with newlines
    normalised to ``\\n``. The first copy of a duplicate (in the package's
    order) is kept. A finished folder holds ``.extracted.json`` (the inputs
    and per-package counts); extracting the same inputs again returns it
    without work. Returns that record.
    """
    debs = Path(debs_dir) if debs_dir is not None else corpus_cache() / "debs"
    text = Path(text_dir) if text_dir is not None else corpus_cache() / "text"
    key = {"format": EXTRACT_FORMAT, "max_doc_bytes": max_doc_bytes,
           "debs": [{k: r[k] for k in ("package", "version", "sha256")} for r in records],
           "rules": [vars(SOURCES[r["package"]]) for r in records]}
    stamp = text / ".extracted.json"
    if stamp.exists():
        done = json.loads(stamp.read_text())
        if done["key"] == key:
            _log(f"reusing the extracted text in {text}")
            return done
        _log(f"{text} was extracted from other inputs: extracting again")
    elif text.exists() and any(text.iterdir()):
        raise FileExistsError(f"text folder {text} exists, is not empty and was not made by extract; "
                              "give another --text folder or delete it")
    partial = text.with_name(text.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    seen: set[bytes] = set()
    stats = []
    for rec in records:
        source = SOURCES[rec["package"]]
        s = {"package": rec["package"], "version": rec["version"], "documents": 0, "bytes": 0,
             "skipped_large": 0, "skipped_large_bytes": 0, "skipped_binary": 0, "skipped_duplicate": 0,
             "skipped_empty": 0}
        t0 = time.time()
        for rel, read, size in _source_files(debs / rec["file"], source):
            if size > max_doc_bytes:
                s["skipped_large"] += 1
                s["skipped_large_bytes"] += size
                continue
            data = read()
            if b"\0" in data:
                s["skipped_binary"] += 1
                continue
            body = _normalise(data.decode("utf-8", errors="replace"))
            if not body.strip():
                s["skipped_empty"] += 1
                continue
            encoded = body.encode("utf-8")
            digest = hashlib.sha256(encoded).digest()
            if digest in seen:
                s["skipped_duplicate"] += 1
                continue
            seen.add(digest)
            out = partial / rec["package"] / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(encoded)
            s["documents"] += 1
            s["bytes"] += len(encoded)
        _log(f"{rec['package']}: {s['documents']} documents, {s['bytes'] / 1e6:.1f} MB "
             f"({time.time() - t0:.0f} s)")
        stats.append(s)
    done = {"key": key, "sources": stats}
    (partial / ".extracted.json").write_text(json.dumps(done, indent=1) + "\n")
    if text.exists():
        shutil.rmtree(text)  # ours: it held a stamp of other inputs
    partial.rename(text)
    return done


# --------------------------------------------------------------------------- 3. build

def list_documents(text_dir: str | os.PathLike) -> list[str]:
    """The document names in a text folder: relative paths of its regular files, hidden ones skipped, sorted."""
    root = Path(text_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such text folder: {str(root)!r}")
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = Path(dirpath) / f
            if not f.startswith(".") and p.is_file() and not p.is_symlink():
                names.append(p.relative_to(root).as_posix())
    return sorted(names)


def split_names(names: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, val)``: the names in a seeded random order, the first ``round(n * val_fraction)`` for validation.

    At least one document goes to each side when ``val_fraction > 0`` and there
    are two or more. Both lists keep the shuffled order, which is the order of
    the token streams.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = sorted(names)
    if len(set(order)) != len(order):
        raise ValueError("document names must be unique")
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return order[n_val:], order[:n_val]


def _read_doc(root: Path, name: str) -> str:
    return _normalise((root / name).read_bytes().decode("utf-8", errors="replace"))


def text_fingerprint(text_dir: str | os.PathLike, names: Sequence[str] | None = None) -> tuple[str, int]:
    """``(sha256, bytes)`` over the sorted names and the bytes of the documents: the identity of the input text."""
    root = Path(text_dir)
    h, total = hashlib.sha256(), 0
    for name in sorted(names if names is not None else list_documents(root)):
        data = (root / name).read_bytes()
        for part in (name.encode(), data):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        total += len(data)
    return h.hexdigest(), total


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _write_stream(tokenizer, root: Path, names: Sequence[str], path: Path, dtype: np.dtype,
                  max_tokens: int | None = None, chunk_chars: int = 4_000_000) -> dict:
    """Tokenize ``names`` in order into ``path`` (``doc EOT doc EOT ...``), a chunk of documents at a time.

    Stops after the document that reaches ``max_tokens``. Returns the counts and the sha256 of the file.
    """
    eot = eot_id(tokenizer)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    limit = np.iinfo(dtype).max
    h = hashlib.sha256()
    tokens = docs = chars = 0
    tmp = path.with_name(path.name + ".partial")
    t0 = time.time()
    last_log = t0
    with open(tmp, "wb") as f:
        i = 0
        while i < len(names) and (max_tokens is None or tokens < max_tokens):
            chunk, size = [], 0
            while i < len(names) and size < chunk_chars:
                chunk.append(_read_doc(root, names[i]))
                size += len(chunk[-1])
                i += 1
            for text, enc in zip(chunk, encode(chunk, add_special_tokens=False)):
                ids = np.empty(len(enc.ids) + 1, dtype=np.int64)
                ids[:-1] = enc.ids
                ids[-1] = eot
                if ids.size and (ids.min() < 0 or ids.max() > limit):
                    raise ValueError(f"token id out of range for {dtype}")
                data = ids.astype(dtype).tobytes()
                f.write(data)
                h.update(data)
                tokens += ids.size
                docs += 1
                chars += len(text)
                if max_tokens is not None and tokens >= max_tokens:
                    break
            if time.time() - last_log > 60:
                last_log = time.time()
                _log(f"{path.name}: {docs}/{len(names)} documents, {tokens / 1e6:.1f}M tokens, "
                     f"{chars / 1e6 / (last_log - t0):.2f} MB/s")
    os.replace(tmp, path)
    return {"file": path.name, "documents": docs, "documents_available": len(names), "tokens": tokens,
            "chars": chars, "bytes": path.stat().st_size, "sha256": _sha256_file(path),
            "seconds": round(time.time() - t0, 1)}


def build(text_dir: str | os.PathLike, out_dir: str | os.PathLike, *, vocab_size: int = 32000, seed: int = 0,
          val_fraction: float = 0.005, sample_chars: int = 20_000_000, tokenizer: str | os.PathLike | None = None,
          max_train_tokens: int | None = None, cache_dir: str | os.PathLike | None = None,
          sources: Sequence[dict] | None = None) -> dict:
    """Tokenize the documents of ``text_dir`` into ``out_dir`` (``train.bin``, ``val.bin``, ``tokenizer.json``,
    ``meta.json``). Returns the metadata.

    ``tokenizer``: a ``tokenizer.json`` to reuse (it must have ``EOT``); else a
    byte-level BPE of ``vocab_size`` entries is trained on about
    ``sample_chars`` characters of training documents (``cggr_lab.data.train_tokenizer``,
    cached in ``cache_dir``). ``max_train_tokens`` stops the training stream
    after the document that reaches it (a random sample of the documents,
    since they are shuffled). ``sources`` is recorded in the metadata.
    """
    from tokenizers import Tokenizer

    t0 = time.time()
    root, out = Path(text_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list_documents(root)
    if len(names) < 2:
        raise ValueError(f"text folder {root} holds {len(names)} documents; need at least 2 (train and val)")
    fingerprint, text_bytes = text_fingerprint(root, names)
    train, val = split_names(names, val_fraction, seed)
    _log(f"{len(names)} documents ({text_bytes / 1e6:.1f} MB): {len(train)} train, {len(val)} val")

    if tokenizer is not None:
        tok = Tokenizer.from_file(str(tokenizer))
        eot_id(tok)  # raises without EOT
        trained = False
    else:
        sample, total = [], 0
        for name in train:
            if total >= sample_chars:
                break
            text = _read_doc(root, name)[: min(65536, sample_chars - total)]
            sample.append((name, text))
            total += len(text)
        t1 = time.time()
        tok = train_tokenizer(sample, vocab_size, cache_dir=cache_dir if cache_dir is not None else env.cache_dir(),
                              sample_chars=sample_chars, seed=seed)
        trained = not getattr(tok, "cggr_cache_hit", False)
        _log(f"tokenizer: {'trained' if trained else 'cached'} on {total / 1e6:.1f}M characters "
             f"({time.time() - t1:.0f} s)")
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    tok.save(str(out / "tokenizer.json"))

    val_stats = _write_stream(tok, root, val, out / "val.bin", dtype)
    train_stats = _write_stream(tok, root, train, out / "train.bin", dtype, max_tokens=max_train_tokens)
    meta = {
        "format": FORMAT, "dtype": dtype.str, "vocab_size": vocab, "eot": EOT, "eot_id": eot_id(tok),
        "seed": seed, "val_fraction": val_fraction, "documents": len(names),
        "text_sha256": fingerprint, "text_bytes": text_bytes,
        "train": train_stats, "val": val_stats,
        "tokenizer": {"file": "tokenizer.json", "sha256": _sha256_file(out / "tokenizer.json"),
                      "trained_here": trained, "sample_chars": None if tokenizer is not None else sample_chars,
                      "given": str(tokenizer) if tokenizer is not None else None},
        "max_train_tokens": max_train_tokens,
        "sources": list(sources) if sources is not None else None,
        "build_seconds": round(time.time() - t0, 1),
    }
    _write_meta(out, meta)
    _log(f"train {train_stats['tokens'] / 1e6:.1f}M tokens ({train_stats['documents']}/{len(train)} documents), "
         f"val {val_stats['tokens'] / 1e6:.2f}M tokens, {meta['build_seconds']:.0f} s")
    return meta


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / "meta.json.partial"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "meta.json")


def read_meta(corpus_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a built (or unpacked) corpus folder."""
    path = Path(corpus_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the corpus first (python -m cggr_lab.corpus build)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_tokenizer(corpus_dir: str | os.PathLike):
    """The corpus's ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(corpus_dir) / "tokenizer.json"))


def verify(corpus_dir: str | os.PathLike) -> dict:
    """Check the sizes and sha256 of ``train.bin``, ``val.bin`` and ``tokenizer.json`` against ``meta.json``."""
    root = Path(corpus_dir)
    meta = read_meta(root)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        s = meta[split]
        path = root / s["file"]
        if path.stat().st_size != s["tokens"] * itemsize:
            raise ValueError(f"{path} holds {path.stat().st_size} bytes, meta.json says {s['tokens']} tokens")
        if _sha256_file(path) != s["sha256"]:
            raise ValueError(f"{path} does not match the sha256 in meta.json")
    if _sha256_file(root / "tokenizer.json") != meta["tokenizer"]["sha256"]:
        raise ValueError(f"{root / 'tokenizer.json'} does not match the sha256 in meta.json")
    return meta


# --------------------------------------------------------------------------- 4. pack / unpack

def _doc_boundary(tokens: np.ndarray, n: int, eot: int) -> int:
    """The largest ``m <= n`` such that ``tokens[:m]`` is whole documents (ends with EOT); 0 if none."""
    n = min(n, tokens.size)
    step = 1 << 16
    end = n
    while end > 0:
        start = max(0, end - step)
        hits = np.flatnonzero(tokens[start:end] == eot)
        if hits.size:
            return start + int(hits[-1]) + 1
        end = start
    return 0


_XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lp": 1, "pb": 1}]
"""LZMA2 at preset 9 with literal-position and position bits of 1 (2-byte symbols). On the 1.87M-token
validation stream of the 32000-entry build: 0.442 bytes per token, against 0.447 at plain preset 9 and
0.443 at "preset 9 extreme, lc=0" (no better, and slower). The 142M-token training prefix of that build packs
at 0.42 bytes per token."""

PACK_MEMBERS = ("meta.json", "tokenizer.json.xz", "val.bin.xz", "train.bin.xz")


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, filters=_XZ_FILTERS)


def _next_boundary(tokens: np.ndarray, n: int, eot: int) -> int:
    """The smallest ``m >= n`` such that ``tokens[:m]`` is whole documents (ends with EOT); the size if none."""
    if n <= 0:
        return 0
    step, start = 1 << 16, n - 1
    while start < tokens.size:
        hits = np.flatnonzero(tokens[start:start + step] == eot)
        if hits.size:
            return start + int(hits[0]) + 1
        start += step
    return int(tokens.size)


def pack(corpus_dir: str | os.PathLike, dest: str | os.PathLike, *, max_mb: float = 60.0,
         train_tokens: int | None = None, chunk_tokens: int = 1 << 20) -> dict:
    """Write ``dest``, a plain tar of ``meta.json``, ``tokenizer.json.xz``, ``val.bin.xz`` (whole) and
    ``train.bin.xz`` (a prefix of ``train.bin`` that ends at a document boundary), at most ``max_mb`` MB
    (10^6 bytes).

    The training prefix is ``train_tokens`` long (rounded down to a document
    boundary) if given, else as long as fits: it is compressed in one pass, a
    chunk of about ``chunk_tokens`` at a time (each chunk ends at a document
    boundary), and stops before the chunk that could overflow the budget. The
    archive's ``meta.json`` is the corpus's with the ``train`` entry of the
    prefix and a ``packed_from`` entry. Raises if the result is over ``max_mb``.
    """
    root, dest = Path(corpus_dir), Path(dest)
    meta = verify(root)
    dtype, eot = np.dtype(meta["dtype"]), meta["eot_id"]
    train = np.memmap(root / meta["train"]["file"], dtype=dtype, mode="r")
    budget = int(max_mb * 1e6)
    small = {"tokenizer.json.xz": _xz((root / "tokenizer.json").read_bytes()),
             "val.bin.xz": _xz((root / meta["val"]["file"]).read_bytes())}
    room = budget - sum(map(len, small.values())) - 64 * 1024  # meta.json and tar headers: a few KB
    limit = train.size if train_tokens is None else _doc_boundary(train, train_tokens, eot)
    if limit == 0:
        raise ValueError(f"train_tokens={train_tokens} holds no whole training document")
    t0 = time.time()
    tmp = dest.with_name(dest.name + ".train.xz.partial")
    h = hashlib.sha256()
    compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, filters=_XZ_FILTERS)
    n = written = pending = 0  # tokens fed, bytes out, input bytes fed since the compressor last gave output
    with open(tmp, "wb") as f:
        while n < limit:
            end = min(limit, _next_boundary(train, n + chunk_tokens, eot))
            data = train[n:end].tobytes()
            # Compressed bytes per input byte so far (1 until the compressor has given output), with 25 % room:
            # what the compressor holds back plus this chunk must still fit.
            done = n * dtype.itemsize - pending
            ratio = 1.25 * written / done if written else 1.0
            if train_tokens is None and written + ratio * (pending + len(data)) + 1024 > room:
                break
            out = compressor.compress(data)
            pending = 0 if out else pending + len(data)
            f.write(out)
            written += len(out)
            h.update(data)
            last_log = n
            n = end
            if n // (16 * chunk_tokens) != last_log // (16 * chunk_tokens) and time.time() - t0 > 60:
                _log(f"pack: {n / 1e6:.0f}M tokens -> {written / 1e6:.1f} MB so far")
        f.write(compressor.flush())
    if n == 0:
        tmp.unlink()
        raise ValueError(f"not one whole training document fits in --max-mb {max_mb}")
    sub = json.loads(json.dumps(meta))
    sub["train"] = {**meta["train"], "tokens": n, "bytes": n * dtype.itemsize, "sha256": h.hexdigest(),
                    "documents": int(np.count_nonzero(train[:n] == eot))}
    sub["train"].pop("chars", None)  # not known for the prefix without decoding it
    sub["packed_from"] = {k: meta["train"][k] for k in ("tokens", "documents", "sha256")}
    partial = dest.with_name(dest.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, f, size: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o644
            tar.addfile(info, f)
        meta_bytes = (json.dumps(sub, indent=1) + "\n").encode()
        add("meta.json", io.BytesIO(meta_bytes), len(meta_bytes))
        for name, data in small.items():
            add(name, io.BytesIO(data), len(data))
        with open(tmp, "rb") as f:
            add("train.bin.xz", f, tmp.stat().st_size)
    tmp.unlink()
    size = partial.stat().st_size
    if size > budget:
        partial.unlink()
        raise ValueError(f"the pack is {size / 1e6:.1f} MB, over --max-mb {max_mb}"
                         + (f"; ask for fewer than {train_tokens} training tokens" if train_tokens else ""))
    os.replace(partial, dest)
    _log(f"pack: {n / 1e6:.1f}M of {train.size / 1e6:.1f}M training tokens, {size / 1e6:.1f} MB "
         f"({time.time() - t0:.0f} s)")
    return sub


def unpack(archive: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Extract a ``pack`` archive into ``out_dir``, decompressing as it goes, and verify it. The same as
    ``tar xf ARCHIVE -C OUT_DIR && xz -d OUT_DIR/*.xz``, then ``python -m cggr_lab.corpus verify OUT_DIR``.
    Returns its metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:") as tar:
        members = tar.getmembers()
        if sorted(m.name for m in members) != sorted(PACK_MEMBERS) or not all(m.isfile() for m in members):
            raise ValueError(f"{archive} holds {sorted(m.name for m in members)}, expected the plain files "
                             f"{sorted(PACK_MEMBERS)}")
        for member in members:  # plain files with the fixed names above: safe to write
            name = member.name.removesuffix(".xz")
            with tar.extractfile(member) as raw, open(out / name, "wb") as dst:
                src = lzma.open(raw) if member.name.endswith(".xz") else raw
                shutil.copyfileobj(src, dst, 1 << 22)
    return verify(out)


# --------------------------------------------------------------------------- batches

class DataRepetitionWarning(UserWarning):
    """Training would see its data more often than allowed (docs/design.md §5: at most twice)."""


def _stream(path: str | os.PathLike, dtype) -> np.memmap:
    path = Path(path)
    if dtype is None:
        meta_path = path.with_name("meta.json")
        if not meta_path.exists():
            raise ValueError(f"dtype not given and no meta.json next to {path}: pass dtype='uint16' or 'uint32'")
        dtype = json.loads(meta_path.read_text())["dtype"]
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


class MemmapBatches:
    """``[batch_size, seq_len]`` LongTensor batches of a token file, read through ``np.memmap``.

    The file is cut into ``windows_per_epoch = tokens // seq_len``
    non-overlapping windows (the tail is dropped). Each epoch visits them in a
    fresh permutation seeded by ``(seed, epoch)``; windows left over at the end
    of an epoch (fewer than a global batch) are skipped, so no window repeats
    within an epoch. Two instances with the same arguments yield the same
    batches. Only the windows of a batch are read from disk.

    With ``world_size > 1`` each global batch of ``batch_size * world_size``
    windows is split by rank: rank ``r`` gets rows ``r*batch_size ...``, so the
    ranks never share a window. ``start_batch`` skips that many batches (to
    resume) without reading them.

    Iterating is endless unless ``max_epochs`` is given. ``epochs_used`` counts
    the epochs consumed (1.0 = every window once); the first batch that takes
    it over ``max_repeats`` raises a ``DataRepetitionWarning`` (once per
    instance). ``epochs_for(num_batches)`` tells a caller in advance.
    Training inputs use ``labels = input_ids`` (the model shifts internally).
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, seq_len: int, seed: int = 0, *,
                 dtype: str | np.dtype | None = None, max_epochs: int | None = None, max_repeats: float = 2.0,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if max_repeats <= 0:
            raise ValueError(f"max_repeats must be positive, got {max_repeats}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.path = Path(path)
        self.tokens = _stream(path, dtype)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.max_epochs, self.max_repeats = max_epochs, max_repeats
        self.rank, self.world_size = rank, world_size
        self.windows_per_epoch = self.tokens.size // seq_len
        self.batches_per_epoch = self.windows_per_epoch // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.path} holds {self.tokens.size} tokens = {self.windows_per_epoch} windows of "
                             f"{seq_len}, fewer than one global batch of {batch_size} x {world_size} ranks")
        self.batches_yielded = start_batch
        self._warned = False

    def __len__(self) -> int:
        """Batches in one epoch."""
        return self.batches_per_epoch

    @property
    def epochs_used(self) -> float:
        return self.batches_yielded / self.batches_per_epoch

    def epochs_for(self, num_batches: int) -> float:
        """Epochs that ``num_batches`` batches (from the start) consume; warns if more than ``max_repeats``."""
        epochs = num_batches / self.batches_per_epoch
        if epochs > self.max_repeats:
            warnings.warn(f"{num_batches} batches of {self.batch_size} x {self.seq_len} read {self.path.name} "
                          f"{epochs:.2f} times, more than max_repeats={self.max_repeats}", DataRepetitionWarning,
                          stacklevel=2)
        return epochs

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The window indices of ``epoch`` in visiting order (all ranks; a multiple of the global batch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        used = self.batches_per_epoch * self.batch_size * self.world_size
        return torch.randperm(self.windows_per_epoch, generator=g)[:used]

    def read_windows(self, indices: Sequence[int]) -> torch.Tensor:
        """The windows ``indices`` as an int64 ``[len(indices), seq_len]`` tensor."""
        s = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * s:(i + 1) * s]) for i in indices])
        return torch.from_numpy(rows.astype(np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, step = divmod(self.batches_yielded, self.batches_per_epoch)
        while self.max_epochs is None or epoch < self.max_epochs:
            order = self.epoch_order(epoch).tolist()
            global_batch = self.batch_size * self.world_size
            for b in range(step, self.batches_per_epoch):
                if not self._warned and (self.batches_yielded + 1) / self.batches_per_epoch > self.max_repeats:
                    self._warned = True
                    warnings.warn(f"{self.path.name}: batch {self.batches_yielded + 1} starts reading the data a "
                                  f"time more than max_repeats={self.max_repeats} ({self.batches_per_epoch} batches "
                                  "per epoch)", DataRepetitionWarning, stacklevel=2)
                first = b * global_batch + self.rank * self.batch_size
                self.batches_yielded += 1
                yield self.read_windows(order[first:first + self.batch_size])
            epoch, step = epoch + 1, 0


def memmap_eval_batches(path: str | os.PathLike, batch_size: int, seq_len: int, num_batches: int, *,
                        dtype: str | np.dtype | None = None) -> list[torch.Tensor]:
    """A fixed list of at most ``num_batches`` ``[batch_size, seq_len]`` LongTensor validation batches.

    Windows are non-overlapping and evenly spaced over the whole file (as
    ``cggr_lab.data.eval_batches``), so a small evaluation samples every part of
    the validation documents; only those windows are read.
    """
    tokens = _stream(path, dtype)
    n = tokens.size // seq_len
    count = min(num_batches * batch_size, n - n % batch_size if n >= batch_size else 0)
    if count == 0:
        raise ValueError(f"{path} holds {tokens.size} tokens, fewer than one batch of {batch_size} x {seq_len}")
    idx = torch.linspace(0, n - 1, count).round().long().tolist()  # spacing >= 1: distinct windows
    rows = np.stack([np.asarray(tokens[i * seq_len:(i + 1) * seq_len]) for i in idx]).astype(np.int64)
    return list(torch.from_numpy(rows).split(batch_size))


# --------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cggr_lab.corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def packages(a):
        a.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), choices=sorted(SOURCES),
                       metavar="PKG", help=f"Debian packages (default and choices: {' '.join(DEFAULT_PACKAGES)})")
        a.add_argument("--debs", type=Path, default=None, help="where the .deb files go (default <cache>/corpus/debs)")

    def extracting(a):
        a.add_argument("--text", type=Path, default=None, help="text folder (default <cache>/corpus/text)")
        a.add_argument("--max-doc-bytes", type=int, default=MAX_DOC_BYTES)

    def building(a):
        a.add_argument("--out", type=Path, required=True, help="output folder for train.bin, val.bin, ...")
        a.add_argument("--vocab-size", type=int, default=32000)
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--val-fraction", type=float, default=0.005)
        a.add_argument("--sample-chars", type=int, default=20_000_000, help="tokenizer training sample")
        a.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer.json instead of training")
        a.add_argument("--max-train-tokens", type=int, default=None, help="stop the training stream after this")

    a = sub.add_parser("fetch", help="apt-get download the packages")
    packages(a)
    a = sub.add_parser("extract", help="fetch, then extract the text files")
    packages(a)
    extracting(a)
    a = sub.add_parser("build", help="tokenize a text folder (made by extract, or any folder of text files)")
    a.add_argument("--text", type=Path, required=True)
    building(a)
    a = sub.add_parser("all", help="fetch, extract and build")
    packages(a)
    extracting(a)
    building(a)
    a = sub.add_parser("pack", help="compress a built corpus into one .tar of at most --max-mb")
    a.add_argument("corpus", type=Path)
    a.add_argument("archive", type=Path)
    a.add_argument("--max-mb", type=float, default=60.0)
    a.add_argument("--train-tokens", type=int, default=None, help="default: as many as fit")
    a = sub.add_parser("unpack", help="extract and verify a pack archive")
    a.add_argument("archive", type=Path)
    a.add_argument("out", type=Path)
    a = sub.add_parser("verify", help="check a corpus folder against its meta.json")
    a.add_argument("corpus", type=Path)
    args = p.parse_args(argv)

    if args.command in ("fetch", "extract", "all"):
        records = fetch(args.packages, args.debs)
        for r in records:
            _log(f"{r['package']} {r['version']}: {r['file']} ({r['bytes'] / 1e6:.1f} MB)")
        if args.command == "fetch":
            return 0
        done = extract(records, args.text, args.debs, args.max_doc_bytes)
        if args.command == "extract":
            return 0
        text = args.text if args.text is not None else corpus_cache() / "text"
        sources = [{**r, **s} for r, s in zip(records, done["sources"])]
        meta = build(text, args.out, vocab_size=args.vocab_size, seed=args.seed, val_fraction=args.val_fraction,
                     sample_chars=args.sample_chars, tokenizer=args.tokenizer,
                     max_train_tokens=args.max_train_tokens, sources=sources)
    elif args.command == "build":
        meta = build(args.text, args.out, vocab_size=args.vocab_size, seed=args.seed,
                     val_fraction=args.val_fraction, sample_chars=args.sample_chars, tokenizer=args.tokenizer,
                     max_train_tokens=args.max_train_tokens)
    elif args.command == "pack":
        meta = pack(args.corpus, args.archive, max_mb=args.max_mb, train_tokens=args.train_tokens)
    elif args.command == "unpack":
        meta = unpack(args.archive, args.out)
    else:
        meta = verify(args.corpus)
    print(json.dumps({k: meta[k] for k in ("vocab_size", "dtype", "documents", "train", "val")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
