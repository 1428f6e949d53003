"""Flax's own example models, read at test time from the official release archive
of the installed Flax (``pip download flax==<version> --no-binary :all:``), never
copied into this repository. Files are used unmodified: examples/imagenet/models.py
is imported whole; from scripts that import what the suite lacks (tensorflow) or
run code at import, the class definitions are taken out with ``ast``
(``ast.get_source_segment``, source unchanged) and executed with their imports."""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile
import types

import flax

VERSION = flax.__version__
DOWNLOAD_TIMEOUT_S = 120
MEMBERS = (
    "examples/imagenet/models.py",
    "examples/mnist/train.py",
    "examples/nnx_toy_examples/06_scan_over_layers.py",
)


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mabn_jax-tests" / f"flax-{VERSION}"


def download_cmd(dest):
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"flax=={VERSION}",
        "--no-binary",
        ":all:",
        "--no-deps",
        "-d",
        str(dest),
    ]


def fetch_examples():
    """The example files' directory (downloaded and extracted once, then cached).
    Raises RuntimeError naming the command when the download fails."""
    root = _cache_dir()
    if all((root / m).exists() for m in MEMBERS):
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"flax-{VERSION}.tar.gz"
    if not archive.exists():
        cmd = download_cmd(root)
        try:
            subprocess.run(
                cmd, check=True, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S
            )
        except (subprocess.SubprocessError, OSError) as err:
            detail = getattr(err, "stderr", "") or ""
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {err} {detail[-500:]}") from err
    with tarfile.open(archive) as tar:
        for m in MEMBERS:
            src = tar.extractfile(f"flax-{VERSION}/{m}")
            (root / m).parent.mkdir(parents=True, exist_ok=True)
            (root / m).write_bytes(src.read())
    return root


def import_file(path, name):
    """A self-contained example file imported whole, as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classes_from(path, names, preamble):
    """The named top-level classes of a script, their source unmodified, executed
    after ``preamble`` (the script's own imports the classes use)."""
    source = pathlib.Path(path).read_text()
    segments = {
        node.name: ast.get_source_segment(source, node)
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
    }
    missing = set(names) - segments.keys()
    if missing:
        raise LookupError(f"{path} has no class {sorted(missing)}")
    namespace = {}
    exec(
        compile(preamble + "\n\n" + "\n\n".join(segments[n] for n in names), str(path), "exec"),
        namespace,
    )
    return types.SimpleNamespace(**{n: namespace[n] for n in names})


def load(root):
    """(imagenet models module, mnist classes, scan-over-layers classes)."""
    imagenet = import_file(root / MEMBERS[0], "flax_examples_imagenet_models")
    mnist = classes_from(
        root / MEMBERS[1],
        ["CNN"],
        "from functools import partial\nfrom flax import nnx\nimport jax",
    )
    scan = classes_from(
        root / MEMBERS[2],
        ["Block", "ScanMLP"],
        "import jax\nimport jax.numpy as jnp\nfrom flax import nnx",
    )
    return imagenet, mnist, scan
