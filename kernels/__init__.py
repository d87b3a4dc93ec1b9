"""Triton kernels of reasonrl (installed as ``reasonrl.kernels``): @triton.jit functions and launch helpers.

Importing a module here imports triton. The registered ops that launch these kernels live in
``reasonrl/ops/`` and import them lazily, so ``import reasonrl`` never imports triton.
"""
