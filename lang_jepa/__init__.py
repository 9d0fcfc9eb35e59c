"""LANG-JEPA: joint-embedding predictive pretraining of sentence concepts."""

__version__ = "0.1.0"
