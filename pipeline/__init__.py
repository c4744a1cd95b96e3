"""maskfold: a K-fold ensemble pipeline for face-mask classification (README.md)."""
from pipeline import openmp as _openmp

_openmp.install()  # torch's OpenMP wait policy, chosen when torch is first imported (libgomp reads it once, then)
