"""Corpora, tokenizer and batches for the demo and the benchmarks (docs/design.md §5).

Everything here is local and deterministic: nothing is downloaded.

* ``load_documents(source)`` -> sorted ``[(name, text), ...]``. ``None`` is the
  embedded default corpus: the ``.py`` files of the running interpreter's
  standard library.
* ``split_documents(docs)`` -> train / validation by *document*, so no
  validation token ever comes from a training document.
* ``train_tokenizer(docs, vocab_size)`` -> a byte-level BPE trained on a
  bounded sample of ``docs``, cached on disk.
* ``encode_documents(tokenizer, docs)`` -> one token stream, documents
  separated by ``EOT``, cached on disk.
* ``TokenBatches(stream, batch_size, seq_len, seed)`` -> ``[batch, seq_len]``
  windows of the stream in a seeded random order, each window once per epoch;
  ``eval_batches(...)`` -> a fixed list of windows for validation.

The cache lives in ``$CGGR_CACHE``, else ``~/.cache/cggr``. Its keys are
hashes of the content (corpus text, vocabulary size, tokenizer), so a changed
corpus never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import random
import re
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch

from cggr import env

Document = tuple[str, str]

EOT = "<|endoftext|>"
"""The end-of-document token, the tokenizer's only special token."""

TEXT_EXTENSIONS = frozenset({
    ".txt", ".text", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".java", ".js", ".ts", ".json", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".html", ".xml",
    ".tex", ".csv", ".sh", ".s", ".S",
})
"""Extensions read from a folder; other files are ignored."""

SECTION_CHARS = 4096
"""Target size of a document cut from one text file (see ``split_text``)."""

_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_CACHE_FORMAT = "cggr-data-v1"  # bump to invalidate every cache entry

# A line that marks the start of a new file in a concatenation: ``==> path <==``
# (what ``head``/``tail`` print between files), or a line holding only EOT.
_SEPARATOR = re.compile(r"^(?:==> (?P<name>.+?) <==|" + re.escape(EOT) + r")[ \t]*$", re.MULTILINE)


# --------------------------------------------------------------------------- documents

def load_documents(source: str | os.PathLike | None = None) -> list[Document]:
    """Documents ``(name, text)`` sorted by name, empty ones dropped.

    ``source``:

    * ``None``: the standard library's ``.py`` files (``sysconfig`` "stdlib"),
      without ``site-packages`` and without the test suites (``test``,
      ``tests``, ``idle_test`` folders: they hold deliberately odd files, such
      as bad encodings, and would more than double the corpus). Names are
      paths relative to the stdlib folder.
    * a folder: every file with a ``TEXT_EXTENSIONS`` suffix, recursively,
      hidden files and folders skipped, one document per file; a ``.xz`` file
      inside is decompressed and counts as one document.
    * a text file, or a ``.xz`` file (decompressed first): cut by
      ``split_text``.

    Text is read as UTF-8 (undecodable bytes replaced) with newlines
    normalised to ``\\n``.
    """
    if source is None:
        return _stdlib_documents()
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_documents(path)
    if path.is_file():
        return split_text(_read_text(path), name=path.name[:-3] if path.suffix == ".xz" else path.name)
    raise FileNotFoundError(f"no such file or folder: {str(source)!r}")


def split_text(text: str, name: str = "text", section_chars: int = SECTION_CHARS) -> list[Document]:
    """Cut one text file into documents.

    If the text contains separator lines (``==> NAME <==``, or a line that is
    only ``<|endoftext|>``), each separated part is a document, named by the
    separator when it gives a name. Otherwise (a plain concatenation such as
    ``python-docs.txt``) consecutive paragraphs, separated by blank lines, are
    packed into documents of about ``section_chars`` characters (a paragraph
    is never cut; a document ends at the first paragraph boundary after
    ``section_chars``), named ``NAME:000000``, ``NAME:000001``, ...
    """
    text = _normalise(text)
    if _SEPARATOR.search(text):
        docs = []
        matches = list(_SEPARATOR.finditer(text))
        bounds = [(0, matches[0].start(), None)] + [
            (m.end(), matches[i + 1].start() if i + 1 < len(matches) else len(text), m.group("name"))
            for i, m in enumerate(matches)
        ]
        for i, (start, end, part_name) in enumerate(bounds):
            body = text[start:end].strip("\n")
            if body.strip():
                docs.append((f"{name}:{i:06d}" + (f":{part_name}" if part_name else ""), body + "\n"))
        return sorted(docs)

    docs, current, size = [], [], 0
    for paragraph in re.split(r"\n[ \t]*\n", text):
        if not paragraph.strip():
            continue
        current.append(paragraph.strip("\n"))
        size += len(paragraph) + 2
        if size >= section_chars:
            docs.append("\n\n".join(current) + "\n")
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current) + "\n")
    return [(f"{name}:{i:06d}", d) for i, d in enumerate(docs)]


def split_documents(docs: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """Train and validation documents, split by whole document.

    Which documents go to validation depends only on ``seed`` and the document
    names (a seeded shuffle of the sorted names), so the split is the same on
    every machine for the same corpus. At least one document goes to each side
    when there are two or more. Both lists keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted({name for name, _ in docs})
    if len(names) != len(docs):
        raise ValueError("document names must be unique")
    n_val = round(len(names) * val_fraction)
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(n_val, 1), len(names) - 1)
    random.Random(seed).shuffle(names)
    val_names = set(names[:n_val])
    train = [d for d in docs if d[0] not in val_names]
    val = [d for d in docs if d[0] in val_names]
    return train, val


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """A hash of the documents' names and texts: the corpus identity in cache keys."""
    h = hashlib.sha256()
    for name, text in docs:
        for part in (name, text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return _normalise(data.decode("utf-8", errors="replace"))


def _walk_files(root: Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def _folder_documents(root: Path) -> list[Document]:
    docs = []
    for p in _walk_files(root):
        if p.suffix in TEXT_EXTENSIONS or p.suffix == ".xz":
            text = _read_text(p)
            if text.strip():
                docs.append((p.relative_to(root).as_posix(), text))
    return sorted(docs)


def _stdlib_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in _walk_files(root, _STDLIB_SKIP_DIRS):
        if p.suffix == ".py":
            text = _read_text(p)
            if text.strip():
                docs.append((p.relative_to(root).as_posix(), text))
    if not docs:
        raise RuntimeError(f"no .py files found under the standard library folder {root}")
    return sorted(docs)


# --------------------------------------------------------------------------- cache

def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$CGGR_CACHE``, else ``~/.cache/cggr``."""
    if path is None:
        path = env.cache_dir()
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, (_CACHE_FORMAT,) + parts)).encode()).hexdigest()[:24]


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs: Sequence[Document], vocab_size: int, cache_dir: str | os.PathLike | None = None,
                    sample_chars: int = 3_000_000, seed: int = 0):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries, ``EOT`` included.

    Trained on a bounded sample of the corpus (documents in a seeded random
    order, each cut to 64K characters, until ``sample_chars`` characters), so
    that training takes seconds whatever the corpus size. Cached in
    ``cache_dir`` (see ``resolve_cache_dir``) under a key of (corpus fingerprint,
    vocab_size, sample_chars, seed); a second call with the same arguments
    loads the file. Check ``tokenizer.cggr_cache_hit`` to see which happened.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOT), got {vocab_size}")
    path = resolve_cache_dir(cache_dir) / (
        f"tokenizer-{_key('tokenizer', corpus_fingerprint(docs), vocab_size, sample_chars, seed)}.json")
    if path.exists():
        tok = Tokenizer.from_file(str(path))
        tok.cggr_cache_hit = True  # type: ignore[attr-defined]
        return tok

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sample, total = [], 0
    for i in order:
        if total >= sample_chars:
            break
        text = docs[i][1][: min(65536, sample_chars - total)]
        sample.append(text)
        total += len(text)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    _atomic_write(path, lambda tmp: tok.save(tmp))
    tok.cggr_cache_hit = False  # type: ignore[attr-defined]
    return tok


def eot_id(tokenizer) -> int:
    """The id of ``EOT`` in ``tokenizer``."""
    i = tokenizer.token_to_id(EOT)
    if i is None:
        raise ValueError(f"tokenizer has no {EOT} token")
    return i


def encode_documents(tokenizer, docs: Sequence[Document], cache_dir: str | os.PathLike | None = None
                     ) -> torch.Tensor:
    """One ``LongTensor`` stream: ``doc_0 EOT doc_1 EOT ... doc_n`` (EOT between documents).

    Cached under a key of (tokenizer, corpus fingerprint); the cache stores
    int32 and the result is int64.
    """
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    path = resolve_cache_dir(cache_dir) / f"tokens-{_key('tokens', tok_hash, corpus_fingerprint(docs))}.pt"
    if path.exists():
        return torch.load(path, weights_only=True).long()

    eot = eot_id(tokenizer)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    pieces: list[torch.Tensor] = []
    sep = torch.tensor([eot], dtype=torch.int32)
    texts = [text for _, text in docs]
    for start in range(0, len(texts), 256):
        for enc in encode(texts[start:start + 256]):
            if pieces:
                pieces.append(sep)
            pieces.append(torch.tensor(enc.ids, dtype=torch.int32))
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    _atomic_write(path, lambda tmp: torch.save(stream, tmp))
    return stream.long()


# --------------------------------------------------------------------------- batches

class TokenBatches:
    """Batches of non-overlapping ``seq_len`` windows of a token stream, in seeded random order.

    The stream is cut into ``windows_per_epoch = len(stream) // seq_len``
    windows (the tail is dropped). Each epoch visits them in a fresh
    permutation (seeded by ``(seed, epoch)``), ``batch_size`` at a time;
    windows left over at the end of an epoch (fewer than ``batch_size``) are
    skipped, so no window appears twice within an epoch or within a batch.
    Two instances with the same arguments yield the same batches.

    Iterating is endless unless ``max_epochs`` is given. ``epochs_used`` is the
    number of epochs consumed so far (a float, 1.0 = every window seen once):
    callers that must not repeat data more than twice check it stays <= 2.
    Training inputs use ``labels = input_ids`` (the model shifts internally).
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0,
                 max_epochs: int | None = None):
        if stream.dim() != 1:
            raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        self.windows_per_epoch = stream.numel() // seq_len
        if self.windows_per_epoch < batch_size:
            raise ValueError(f"stream of {stream.numel()} tokens holds {self.windows_per_epoch} windows of "
                             f"{seq_len}, fewer than one batch of {batch_size}")
        self.windows = stream[: self.windows_per_epoch * seq_len].long().view(self.windows_per_epoch, seq_len)
        self.batch_size, self.seq_len, self.seed, self.max_epochs = batch_size, seq_len, seed, max_epochs
        self.batches_per_epoch = self.windows_per_epoch // batch_size
        self.batches_yielded = 0

    @property
    def epochs_used(self) -> float:
        return self.batches_yielded / self.batches_per_epoch

    def __len__(self) -> int:
        """Batches in one epoch."""
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The window indices of ``epoch`` in visiting order (the used ones: a multiple of ``batch_size``)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.windows_per_epoch, generator=g)[: self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            order = self.epoch_order(epoch)
            for start in range(0, order.numel(), self.batch_size):
                self.batches_yielded += 1
                yield self.windows[order[start:start + self.batch_size]]
            epoch += 1


def eval_batches(stream: torch.Tensor, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
    """A fixed list of at most ``num_batches`` ``[batch_size, seq_len]`` validation batches.

    Windows are non-overlapping and evenly spaced over the whole stream, so a
    small evaluation still samples every part of the validation documents.
    """
    n = stream.numel() // seq_len
    count = min(num_batches * batch_size, n - n % batch_size if n >= batch_size else 0)
    if count == 0:
        raise ValueError(f"validation stream of {stream.numel()} tokens is shorter than one batch "
                         f"of {batch_size} x {seq_len}")
    windows = stream[: n * seq_len].long().view(n, seq_len)
    idx = torch.linspace(0, n - 1, count).round().long()  # spacing >= 1: distinct windows
    return list(windows[idx].split(batch_size))
