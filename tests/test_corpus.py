"""cggr_lab.corpus: the large corpus pipeline (minus apt) on tiny synthetic inputs, and the memmap batch reader."""

import io
import json
import random
import shutil
import subprocess
import tarfile
import warnings

import numpy as np
import pytest
import torch

from cggr_lab import corpus

WORDS = ("the of and to in is for that routing gradient token depth block kernel static int return "
         "struct void if else while fn élan naïve über 変数 λ").split()


def _doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(1, 12)):
        lines.append("\t" * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14))))
    return "\n".join(lines) + ("\n" if rng.random() < 0.8 else "")


def _text_folder(root, n_docs: int, seed: int) -> dict[str, str]:
    """``n_docs`` distinct documents in nested folders, some with CRLF newlines; returns name -> normalised text."""
    rng = random.Random(seed)
    docs = {}
    for i in range(n_docs):
        name = f"pkg{i % 3}/dir{i % 5}/doc{i:03d}.{rng.choice(['c', 'h', 'rst', 'txt'])}"
        text = f"/* document {i} */\n" + _doc(rng)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        crlf = i % 7 == 0
        path.write_bytes((text.replace("\n", "\r\n") if crlf else text).encode())
        docs[name] = text
    (root / ".hidden").write_text("not a document")
    return docs


def _split_docs(tokens: np.ndarray, eot: int) -> list[list[int]]:
    assert tokens.size and tokens[-1] == eot, "a stream ends with EOT"
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    docs = _text_folder(tmp / "text", 60, seed=11)
    meta = corpus.build(tmp / "text", tmp / "out", vocab_size=400, seed=5, val_fraction=0.1,
                        sample_chars=200_000, cache_dir=tmp / "cache")
    return tmp, docs, meta


def test_build_round_trips_and_splits_by_document(built):
    tmp, docs, meta = built
    out = tmp / "out"
    tok = corpus.load_tokenizer(out)
    assert meta["dtype"] == "<u2" and meta["vocab_size"] == 400 == tok.get_vocab_size()
    train_names, val_names = corpus.split_names(list(docs), 0.1, seed=5)
    assert len(val_names) == 6 and not set(train_names) & set(val_names)
    assert set(train_names) | set(val_names) == set(docs)
    assert train_names != sorted(train_names), "documents are shuffled"
    for split, names in (("train", train_names), ("val", val_names)):
        tokens = np.fromfile(out / f"{split}.bin", dtype="<u2")
        assert tokens.size == meta[split]["tokens"] and meta[split]["documents"] == len(names)
        pieces = _split_docs(tokens, meta["eot_id"])
        decoded = [tok.decode(p, skip_special_tokens=False) for p in pieces]
        assert decoded == [docs[n] for n in names], f"{split} stream decodes to its documents in shuffled order"
    assert meta["train"]["chars"] + meta["val"]["chars"] == sum(len(t) for t in docs.values())
    assert corpus.verify(out)["text_sha256"] == corpus.text_fingerprint(tmp / "text")[0]


def test_build_is_reproducible_and_reuses_a_tokenizer(built, tmp_path):
    tmp, docs, meta = built
    again = corpus.build(tmp / "text", tmp_path / "again", seed=5, val_fraction=0.1,
                         tokenizer=tmp / "out" / "tokenizer.json")
    assert again["train"]["sha256"] == meta["train"]["sha256"] and again["val"]["sha256"] == meta["val"]["sha256"]
    assert again["tokenizer"]["trained_here"] is False
    other = corpus.build(tmp / "text", tmp_path / "other", seed=6, val_fraction=0.1,
                         tokenizer=tmp / "out" / "tokenizer.json")
    assert other["val"]["sha256"] != meta["val"]["sha256"], "another seed holds out other documents"


def test_max_train_tokens_stops_at_a_document_boundary(built, tmp_path):
    tmp, docs, meta = built
    limit = meta["train"]["tokens"] // 3
    cut = corpus.build(tmp / "text", tmp_path / "cut", seed=5, val_fraction=0.1,
                       tokenizer=tmp / "out" / "tokenizer.json", max_train_tokens=limit)
    full = np.fromfile(tmp / "out" / "train.bin", dtype="<u2")
    part = np.fromfile(tmp_path / "cut" / "train.bin", dtype="<u2")
    assert limit <= part.size < meta["train"]["tokens"] and part[-1] == meta["eot_id"]
    assert np.array_equal(part, full[:part.size])
    assert cut["train"]["documents"] < cut["train"]["documents_available"]


def test_verify_detects_a_changed_stream(built, tmp_path):
    tmp, _, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "out", copy)
    data = bytearray((copy / "val.bin").read_bytes())
    data[0] ^= 1
    (copy / "val.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        corpus.verify(copy)


def test_pack_unpack_round_trip(built, tmp_path):
    tmp, _, meta = built
    full = np.fromfile(tmp / "out" / "train.bin", dtype="<u2")
    sub = corpus.pack(tmp / "out", tmp_path / "c.tar", train_tokens=meta["train"]["tokens"] // 2)
    n = sub["train"]["tokens"]
    assert n <= meta["train"]["tokens"] // 2 and full[n - 1] == meta["eot_id"]
    back = corpus.unpack(tmp_path / "c.tar", tmp_path / "unpacked")
    assert back == sub and back["packed_from"]["sha256"] == meta["train"]["sha256"]
    assert np.array_equal(np.fromfile(tmp_path / "unpacked" / "train.bin", dtype="<u2"), full[:n])
    assert (tmp_path / "unpacked" / "val.bin").read_bytes() == (tmp / "out" / "val.bin").read_bytes()
    whole = corpus.pack(tmp / "out", tmp_path / "w.tar", max_mb=1.0)  # everything fits in 1 MB
    assert whole["train"]["tokens"] == meta["train"]["tokens"]
    # A budget that holds about half the training stream: the prefix stops at a document boundary under it.
    out = tmp / "out"
    fixed = len(corpus._xz((out / "tokenizer.json").read_bytes())) + len(corpus._xz((out / "val.bin").read_bytes()))
    half = len(corpus._xz(full.tobytes())) // 2
    max_mb = (fixed + 64 * 1024 + half) / 1e6
    cut = corpus.pack(out, tmp_path / "h.tar", max_mb=max_mb, chunk_tokens=64)
    n = cut["train"]["tokens"]
    assert 0 < n < full.size and full[n - 1] == meta["eot_id"]
    assert (tmp_path / "h.tar").stat().st_size <= max_mb * 1e6
    assert corpus.unpack(tmp_path / "h.tar", tmp_path / "h") == cut
    assert np.array_equal(np.fromfile(tmp_path / "h" / "train.bin", dtype="<u2"), full[:n])
    with pytest.raises(ValueError, match="max-mb"):
        corpus.pack(tmp / "out", tmp_path / "x.tar", train_tokens=meta["train"]["tokens"], max_mb=0.001)


def test_split_names_errors_and_edges():
    with pytest.raises(ValueError, match="val_fraction"):
        corpus.split_names(["a", "b"], 1.0, 0)
    train, val = corpus.split_names(["a", "b"], 0.01, 0)
    assert len(train) == len(val) == 1
    assert corpus.split_names(["a", "b", "c"], 0.0, 0)[1] == []


@pytest.mark.parametrize("path,selected", [
    ("drivers/net/foo.c", True), ("include/linux/list.h", True), ("arch/x86/Kconfig.cpu", True),
    ("Documentation/admin-guide/README.rst", True), ("arch/x86/entry/entry_64.S", True),
    ("scripts/checkpatch.pl", False), ("drivers/gpu/foo.dtsi", False), ("Makefile", False),
])
def test_linux_source_rule(path, selected):
    assert bool(__import__("re").fullmatch(corpus.SOURCES["linux-source-6.1"].include, path)) == selected


def _fake_deb(tmp, package: str, files: dict[str, bytes]):
    root = tmp / f"{package}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.2-3\nArchitecture: all\n"
                                             "Maintainer: t <t@example.com>\nDescription: test\n")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (tmp / "debs").mkdir(exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root),
                    str(tmp / "debs" / f"{package}_1.2-3_all.deb")], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian or Ubuntu)")
def test_fetch_reuses_debs_and_extract_selects_files(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in {"linux-source-6.1/kernel/a.c": b"int a;\r\n", "linux-source-6.1/kernel/big.h": b"x" * 5000,
                           "linux-source-6.1/tools/x.py": b"print()\n", "linux-source-6.1/Kconfig": b"menu\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _fake_deb(tmp_path, "linux-source-6.1", {"usr/src/linux-source-6.1.tar.xz": buf.getvalue()})
    _fake_deb(tmp_path, "git-doc", {"usr/share/doc/git-doc/a.txt": b"same\n", "usr/share/doc/git-doc/b.txt": b"same\n",
                                    "usr/share/doc/git-doc/bin.txt": b"a\0b", "usr/share/doc/git-doc/e.txt": b" \n",
                                    "usr/share/doc/git-doc/x.html": b"<p>no</p>"})
    records = corpus.fetch(["linux-source-6.1", "git-doc"], tmp_path / "debs")  # present: no apt-get
    assert [r["version"] for r in records] == ["1.2-3", "1.2-3"]
    done = corpus.extract(records, tmp_path / "text", tmp_path / "debs", max_doc_bytes=4096)
    assert corpus.list_documents(tmp_path / "text") == [
        "git-doc/usr/share/doc/git-doc/a.txt", "linux-source-6.1/Kconfig", "linux-source-6.1/kernel/a.c"]
    assert (tmp_path / "text" / "linux-source-6.1/kernel/a.c").read_bytes() == b"int a;\n"
    linux, git = done["sources"]
    assert (linux["documents"], linux["skipped_large"]) == (2, 1)
    assert (git["documents"], git["skipped_duplicate"], git["skipped_binary"], git["skipped_empty"]) == (1, 1, 1, 1)
    assert corpus.extract(records, tmp_path / "text", tmp_path / "debs", max_doc_bytes=4096) == done  # reused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by extract"):
        corpus.extract(records, tmp_path / "other", tmp_path / "debs")
    with pytest.raises(ValueError, match="no extraction rule"):
        corpus.fetch(["not-a-package"], tmp_path / "debs")


# --------------------------------------------------------------------------- batches

@pytest.fixture
def arange_file(tmp_path):
    """A stream whose token i is i % 65536 (uint16): every window is identified by its first token."""
    path = tmp_path / "s.bin"
    np.arange(1000, dtype="<u2").tofile(path)
    return path


@pytest.mark.parametrize("seed", [0, 7])
def test_memmap_batches_shapes_epochs_and_determinism(arange_file, seed):
    b = corpus.MemmapBatches(arange_file, batch_size=4, seq_len=30, seed=seed, dtype="uint16", max_epochs=2)
    assert b.windows_per_epoch == 33 and len(b) == 8
    batches = list(b)
    assert len(batches) == 16 and b.epochs_used == 2.0
    for x in batches:
        assert x.shape == (4, 30) and x.dtype == torch.long
        assert torch.equal(x - x[:, :1], torch.arange(30).expand(4, 30)), "rows are contiguous windows"
        assert (x[:, 0] % 30 == 0).all(), "windows do not overlap"
    for epoch in (batches[:8], batches[8:]):
        starts = torch.cat([x[:, 0] for x in epoch]).tolist()
        assert len(set(starts)) == 32, "no window twice within an epoch"
    again = list(corpus.MemmapBatches(arange_file, 4, 30, seed=seed, dtype="uint16", max_epochs=2))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    other = list(corpus.MemmapBatches(arange_file, 4, 30, seed=seed + 1, dtype="uint16", max_epochs=1))
    assert not all(torch.equal(x, y) for x, y in zip(batches, other))


def test_memmap_batches_ranks_and_resume(arange_file):
    single = list(corpus.MemmapBatches(arange_file, 6, 10, seed=3, dtype="uint16", max_epochs=1))
    ranks = [list(corpus.MemmapBatches(arange_file, 3, 10, seed=3, dtype="uint16", max_epochs=1,
                                       rank=r, world_size=2)) for r in range(2)]
    for whole, r0, r1 in zip(single, *ranks):
        assert torch.equal(whole, torch.cat([r0, r1]))
    full = list(corpus.MemmapBatches(arange_file, 4, 30, seed=1, dtype="uint16", max_epochs=2))
    resumed = corpus.MemmapBatches(arange_file, 4, 30, seed=1, dtype="uint16", max_epochs=2, start_batch=11)
    assert resumed.epochs_used == 11 / 8
    assert all(torch.equal(x, y) for x, y in zip(full[11:], resumed, strict=True))


def test_memmap_batches_warns_on_repetition(arange_file):
    b = corpus.MemmapBatches(arange_file, 4, 30, dtype="uint16", max_epochs=3)  # 8 batches an epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, _ in enumerate(b):
            hits = [w for w in caught if issubclass(w.category, corpus.DataRepetitionWarning)]
            assert len(hits) == (1 if i >= 16 else 0), f"batch {i}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(corpus.MemmapBatches(arange_file, 4, 30, dtype="uint16", max_epochs=2))  # twice: no warning
        assert corpus.MemmapBatches(arange_file, 4, 30, dtype="uint16").epochs_for(16) == 2.0
    with pytest.warns(corpus.DataRepetitionWarning, match="2.12 times"):
        corpus.MemmapBatches(arange_file, 4, 30, dtype="uint16").epochs_for(17)
    with pytest.warns(corpus.DataRepetitionWarning):
        next(iter(corpus.MemmapBatches(arange_file, 4, 30, dtype="uint16", max_repeats=0.1)))


def test_memmap_batches_errors(arange_file, tmp_path):
    with pytest.raises(ValueError, match="dtype not given"):
        corpus.MemmapBatches(arange_file, 4, 30)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        corpus.MemmapBatches(arange_file, 20, 30, dtype="uint16", world_size=2)
    with pytest.raises(ValueError, match="rank"):
        corpus.MemmapBatches(arange_file, 4, 30, dtype="uint16", rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size and seq_len"):
        corpus.MemmapBatches(arange_file, 0, 30, dtype="uint16")


def test_memmap_reads_dtype_from_meta(built):
    tmp, _, _ = built
    x = next(iter(corpus.MemmapBatches(tmp / "out" / "train.bin", 2, 16, seed=0)))  # no dtype given
    tokens = np.fromfile(tmp / "out" / "train.bin", dtype="<u2")
    windows = tokens[: tokens.size // 16 * 16].reshape(-1, 16)
    assert x.shape == (2, 16) and all(any(np.array_equal(r, w) for w in windows) for r in x.numpy())


def test_memmap_eval_batches_fixed_and_spread(arange_file):
    evals = corpus.memmap_eval_batches(arange_file, 4, 30, num_batches=3, dtype="uint16")
    assert len(evals) == 3 and all(e.shape == (4, 30) and e.dtype == torch.long for e in evals)
    starts = torch.cat([e[:, 0] for e in evals]).tolist()
    assert len(set(starts)) == 12 and starts[0] == 0 and starts[-1] == 32 * 30
    again = corpus.memmap_eval_batches(arange_file, 4, 30, num_batches=3, dtype="uint16")
    assert all(torch.equal(x, y) for x, y in zip(evals, again))
    assert len(corpus.memmap_eval_batches(arange_file, 4, 30, num_batches=100, dtype="uint16")) == 8
    with pytest.raises(ValueError, match="fewer than one batch"):
        corpus.memmap_eval_batches(arange_file, 4, 300, num_batches=1, dtype="uint16")


def test_meta_json_is_plain_json(built):
    tmp, _, meta = built
    assert json.loads((tmp / "out" / "meta.json").read_text()) == meta
