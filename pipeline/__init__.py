"""maskfold: a K-fold ensemble pipeline for face-mask classification (README.md)."""
from pipeline import openmp as _openmp

_openmp.choose_wait_policy()  # before anything imports torch: libgomp reads its wait policy once, when it loads
