"""cggr_lab: the experiment side of cggr (corpora, quality and speed runs); not part of the library API."""
