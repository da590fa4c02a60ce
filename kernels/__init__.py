"""Triton kernels of amapo-fast, installed as ``amapo_fast.kernels``.

Importing this package has no side effects: the kernels are defined in their own modules, which
import triton only when they are imported.
"""
