"""Sphinx configuration for fastopt's documentation.

Build (from the repository root, in the environment fastopt is installed in)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest
"""

import os
import sys

import fastopt  # autodoc documents the installed package

sys.path.insert(0, os.path.abspath("_ext"))  # benchtables
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up log, in doctest

project = "fastopt"
author = "the fastopt developers"
copyright = "the fastopt developers"
release = fastopt.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' Args:/Returns:/Example: sections
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "benchtables",  # docs/_ext/benchtables.py: tables from docs/_data/bench-*.json
]

exclude_patterns = ["_build", "_data", "_ext"]
root_doc = "index"
nitpicky = True  # a cross-reference that resolves to nothing is a warning (an error under -W)

# autodoc: the public API as fastopt exports it; signatures as written
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# doctest: every `>>>` block (the docstrings autodoc pulls in included) and the pages'
# testcode blocks. Examples for an optional framework carry `:skipif: not HAVE_<NAME>`, so
# the build passes (skipping them) where that framework is not installed.
doctest_global_setup = """
import importlib.util as _util
import numpy as np
import fastopt
HAVE_TORCH = _util.find_spec("torch") is not None
HAVE_JAX = _util.find_spec("jax") is not None
HAVE_TF = _util.find_spec("tensorflow") is not None
"""
doctest_test_doctest_blocks = "default"

html_theme = "alabaster"
html_title = f"fastopt {release}"
html_static_path = []
html_theme_options = {"description": "compiled optimizer kernels for any framework"}
