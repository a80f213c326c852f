"""Compiled CPU kernels (built from kernels/cpu by setup.py)."""
