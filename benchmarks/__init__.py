"""The benchmarks of cggr, run from the repository root as modules of this package:

    python -m benchmarks.speed --models 350M,1B --out benchmarks/results

Run by path (``python benchmarks/speed.py``), Python would put this folder first on ``sys.path``, and every
file in it would shadow an installed package of the same name for the whole process (``kernels.py`` once
hid Hugging Face's ``kernels`` package from transformers, so no model could be built); each script refuses
to run that way.
"""
