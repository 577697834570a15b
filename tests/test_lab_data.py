"""cggr_lab.data: corpora, tokenizer, batches."""

import lzma

import pytest
import torch

from cggr_lab import data
from tests.textdata import _corpus_folder, _paragraphs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- documents

def test_folder_documents_recursive_sorted(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "c").mkdir(parents=True)
    (root / "z.txt").write_text("zed\r\nline\n")
    (root / "b" / "a.md").write_text("alpha\n")
    (root / "b" / "c" / "deep.py").write_text("x = 1\n")
    (root / "b" / "c" / "packed.txt.xz").write_bytes(lzma.compress(b"packed text\n"))
    (root / "image.bin").write_bytes(b"\x00\x01")
    (root / ".hidden.txt").write_text("secret\n")
    (root / "empty.txt").write_text("  \n")
    docs = data.load_documents(root)
    assert docs == [("b/a.md", "alpha\n"), ("b/c/deep.py", "x = 1\n"), ("b/c/packed.txt.xz", "packed text\n"),
                    ("z.txt", "zed\nline\n")]
    assert data.load_documents(str(root)) == docs


def test_text_file_packs_paragraphs(tmp_path):
    paragraphs = _paragraphs(60)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n")
    docs = data.split_text(path.read_text(), name="corpus.txt", section_chars=1000)
    assert data.load_documents(path) == data.split_text(path.read_text(), name="corpus.txt")
    assert len(docs) > 5
    assert [n for n, _ in docs] == sorted(n for n, _ in docs) and docs[0][0] == "corpus.txt:000000"
    # Every paragraph lands in exactly one document, whole and in order; sizes near the target.
    assert [p for _, t in docs for p in t.strip("\n").split("\n\n")] == paragraphs
    assert all(1000 <= len(t) < 1000 + 400 for _, t in docs[:-1])


def test_text_file_separators(tmp_path):
    text = "==> a.py <==\nprint(1)\n\n==> b/c.txt <==\nhello\n<|endoftext|>\nthird part\n"
    docs = data.split_text(text, name="f")
    assert [t for _, t in docs] == ["print(1)\n", "hello\n", "third part\n"]
    assert docs[0][0].endswith(":a.py") and docs[1][0].endswith(":b/c.txt")


def test_xz_file_matches_plain_file(tmp_path):
    text = "\n\n".join(_paragraphs(40)) + "\n"
    (tmp_path / "corpus.txt").write_text(text)
    (tmp_path / "corpus.txt.xz").write_bytes(lzma.compress(text.encode()))
    assert data.load_documents(tmp_path / "corpus.txt.xz") == data.load_documents(tmp_path / "corpus.txt")


def test_stdlib_default_corpus():
    docs = data.load_documents(None)
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "os.py" in names and "json/__init__.py" in names
    assert not any(n.startswith(("site-packages/", "test/")) or "/test/" in n for n in names)


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_documents(tmp_path / "nope")


def test_split_is_by_document_and_deterministic(tmp_path):
    docs = data.load_documents(_corpus_folder(tmp_path / "c", n_docs=100))
    train, val = data.split_documents(docs, val_fraction=0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert not {n for n, _ in train} & {n for n, _ in val}
    assert sorted(train + val) == docs
    assert data.split_documents(docs, val_fraction=0.1, seed=0) == (train, val)
    assert data.split_documents(docs, val_fraction=0.1, seed=1)[1] != val
    # Small corpora still hold one document out.
    assert len(data.split_documents(docs[:3], val_fraction=0.05)[1]) == 1


# --------------------------------------------------------------------------- tokenizer and streams

def test_tokenizer_and_stream_cache(tmp_path):
    docs = data.load_documents(_corpus_folder(tmp_path / "c", n_docs=12))
    tok = data.train_tokenizer(docs, vocab_size=300)
    assert tok.cggr_cache_hit is False
    assert tok.get_vocab_size() == 300
    cached = data.train_tokenizer(docs, vocab_size=300)
    assert cached.cggr_cache_hit is True
    sample = docs[0][1]
    assert cached.encode(sample).ids == tok.encode(sample).ids
    assert tok.decode(tok.encode(sample).ids) == sample  # byte-level BPE is lossless
    assert data.train_tokenizer(docs, vocab_size=280).cggr_cache_hit is False  # the key holds vocab_size
    assert data.train_tokenizer(docs[1:], vocab_size=300).cggr_cache_hit is False  # and the corpus
    assert len(list((tmp_path / "cache").glob("tokenizer-*.json"))) == 3

    stream = data.encode_documents(tok, docs)
    assert stream.dtype == torch.long and stream.dim() == 1
    eot = data.eot_id(tok)
    assert int((stream == eot).sum()) == len(docs) - 1  # one EOT between documents
    first = stream[: int((stream == eot).nonzero()[0])]
    assert tok.decode(first.tolist()) == docs[0][1]
    assert len(list((tmp_path / "cache").glob("tokens-*.pt"))) == 1
    assert torch.equal(data.encode_documents(cached, docs), stream)
    assert len(list((tmp_path / "cache").glob("tokens-*.pt"))) == 1  # a hit, no new file


# --------------------------------------------------------------------------- batches

def test_token_batches_cover_windows_without_repeats():
    seq, batch, n_windows = 4, 3, 17
    stream = torch.arange(n_windows * seq + 2)  # a tail shorter than a window is dropped
    tb = data.TokenBatches(stream, batch, seq, seed=0, max_epochs=2)
    assert tb.windows_per_epoch == 17 and len(tb) == 5
    batches = list(tb)
    assert len(batches) == 10 and tb.epochs_used == 2.0
    assert all(b.shape == (batch, seq) and b.dtype == torch.long for b in batches)
    for epoch in (batches[:5], batches[5:]):
        starts = torch.cat([b[:, 0] for b in epoch])
        assert starts.unique().numel() == 15  # no window twice in an epoch
        assert bool((starts % seq == 0).all())  # aligned, non-overlapping windows
        assert all(torch.equal(b, b[:, :1] + torch.arange(seq)) for b in epoch)  # contiguous
    assert not torch.equal(torch.cat(batches[:5]), torch.cat(batches[5:]))  # fresh order per epoch
    again = list(data.TokenBatches(stream, batch, seq, seed=0, max_epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = list(data.TokenBatches(stream, batch, seq, seed=1, max_epochs=1))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_token_batches_partial_epoch_and_errors():
    tb = data.TokenBatches(torch.arange(100), 2, 5, seed=3)
    it = iter(tb)
    for _ in range(5):
        next(it)
    assert tb.epochs_used == 0.5
    with pytest.raises(ValueError):
        data.TokenBatches(torch.arange(9), 2, 5)


def test_eval_batches_fixed_and_spread():
    stream = torch.arange(1000)
    batches = data.eval_batches(stream, batch_size=4, seq_len=10, num_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 10) for b in batches)
    starts = torch.cat([b[:, 0] for b in batches])
    assert starts.unique().numel() == 12 and int(starts[0]) == 0 and int(starts[-1]) == 990
    assert len(data.eval_batches(torch.arange(45), 2, 10, num_batches=5)) == 2
    with pytest.raises(ValueError):
        data.eval_batches(torch.arange(15), 2, 10, num_batches=1)
