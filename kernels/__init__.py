"""Triton kernels of reasonrl (installed as ``reasonrl.kernels``): @triton.jit functions and launch helpers.

Importing a module here imports triton. The registered ops that launch these kernels live in
``reasonrl/ops/`` and import them lazily, so ``import reasonrl`` never imports triton.
"""

if __name__ == "kernels":  # imported as a top-level package from the checkout root, not as reasonrl.kernels
    from reasonrl._toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)  # an installed `kernels` package wins (reasonrl/_toplevel.py)
