"""Sphinx configuration: `make docs` builds the API reference and these pages.

Sphinx with MyST (Markdown) and napoleon (Google-style docstring sections), as
flax and optax do. The build runs nitpicky with warnings as errors, so every
cross-reference to a mabn_jax name in a docstring must resolve; references to
other libraries (no intersphinx: the build needs no network) are listed in
`nitpick_ignore_regex`.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout, not whatever is installed

import mabn_jax  # noqa: E402

project = "mabn_jax"
author = "mabn_jax developers"
copyright = "mabn_jax developers, Apache-2.0"
release = version = mabn_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

nitpicky = True
nitpick_ignore_regex = [
    # Other libraries' names, and the typing aliases of signatures.
    (r"py:.*", r"(jax|jnp|lax|flax|nn|nnx|optax|numpy|np|orbax|collections|typing)\b.*"),
    (
        r"py:.*",
        r"(Array|Dtype|Initializer|Any|Callable|Mapping|Sequence|Tree|Path"
        r"|PromoteDtypeFn|DynamicScale|DynamicScaleResult)",
    ),
    (r"py:.*", r"(int|float|bool|str|tuple|dict|list|type|None|object)"),
    (r"py:.*", r".*\[.*"),  # pieces of a split generic annotation, e.g. "int | tuple[int"
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"mabn_jax {version}"
html_static_path: list[str] = []
