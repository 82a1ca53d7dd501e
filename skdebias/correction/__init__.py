"""Bias correction estimators: RR-ClArC, A-/P-ClArC, spuriosity head fine-tuning, FMD, EnD."""

__all__ = []
