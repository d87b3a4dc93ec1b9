"""Keeps the checkout's top-level kernels/ and bench/ folders from shadowing installed packages.

kernels/ (Triton kernels) and bench/ (benchmarks) are top-level folders of the repository, installed as
``reasonrl.kernels`` and ``reasonrl.bench`` (pyproject.toml maps them). With the repository root on sys.path
(``python -m`` or pytest run from the checkout, setup.py, a user's script next to it) they are ALSO
importable as the top-level packages ``kernels`` and ``bench``, and a regular package found first on
sys.path wins over an installed distribution of the same name. That is how the checkout broke
transformers >= 5.25, which imports Hugging Face's ``kernels`` package: it got reasonrl's folder.

Each folder's ``__init__.py`` therefore calls :func:`defer_to_installed` when it is being imported under its
top-level name: if another package of that name is installed (found on sys.path without the checkout
root), that package is loaded in its place and becomes ``sys.modules[name]``, so the ``import`` statement
returns it. Without one, the folder stays importable as before (``python -m bench.bench_linear`` from the
root still works). Importing the folders as ``reasonrl.kernels`` / ``reasonrl.bench`` never gets here.
The mechanism is chosen over renaming the folders (the layout keeps them) and over removing their
``__init__.py`` (a namespace package would not shadow, but setuptools' editable install cannot map a
namespace subpackage of a regular package). tests/test_packaging.py runs both cases in a subprocess.

Nothing here imports anything but the standard library.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def defer_to_installed(name: str, init_file: str) -> bool:
    """Replace ``sys.modules[name]`` (being imported from ``init_file``) by an installed package ``name``.

    Returns True when it did. ``init_file`` is the folder's ``__init__.py``; the folder's parent (the
    checkout root) is left out of the search, under every spelling sys.path may hold it ('' is the cwd).
    """
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement in progress returns whatever sys.modules holds
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return True
