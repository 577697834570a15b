"""Small synthetic text corpora for the harness tests (cggr_lab.data, cggr_lab.demo)."""

import random

WORDS = ("the model routes gradients per token easy tokens stop early hard tokens go deep "
         "through every block of the stack while the optimizer steps").split()


def _paragraphs(n, seed=0, words=40):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def _corpus_folder(root, n_docs=40, seed=0):
    root.mkdir()
    for i in range(n_docs):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text("\n\n".join(_paragraphs(3, seed * 1000 + i)) + "\n")
    return root
