import os
import sys

# Kernels are tested on the CPU through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
