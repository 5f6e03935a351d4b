"""CRCE: Coreference-Retention Concept Erasure pipeline (Xue et al., BMVC 2025)."""

__version__ = "0.1.0"
