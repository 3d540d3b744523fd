"""Float32 and bfloat16 linear layers run by oneDNN with their weights packed once, for CPU inference.

A transformer encoder's CPU time goes almost entirely to its linear layers. torch's x86 build sends float32
``nn.Linear`` to MKL's sgemm, and MKL, which picks its code path by CPU vendor, runs well below the machine's
peak on AMD processors: 85-145 GFLOP/s on 2 cores of the AMD EPYC (AVX-512) these benchmarks ran on, where
oneDNN, given a weight reordered once into its blocked layout, reached 165-205 for MiniLM's shapes (and 100
against MKL's 51 for 8-row batches). Both compute in float32; outputs agree to about 1e-6 relative.

On a CPU with AVX512-BF16 (or AMX) the same operators run bfloat16 weights and activations on the native
bfloat16 dot-product instructions, accumulating in float32: about 2.3x the float32 rate for MiniLM's shapes on
one core of the AMD EPYC above (64 against 28 GFLOP/s, measured with 2,048-token batches). Not on every such CPU:
an Intel Xeon with AVX512-BF16 but no AMX ran them at 0.6x float32 (see :func:`bfloat16_linear_speedup`).

An MLP's activation (GELU, exact or tanh, ReLU, SiLU) is fused into its first linear layer as a oneDNN post-op,
computed on the output while it is still in cache instead of in a pass of its own: MiniLM's 1,700 x 384 x 1,536
intermediate layer with its GELU took 15.3 ms fused against 16.3 unfused (float32, one core of an Intel Xeon,
medians of 15). The result is bit-identical in float32 (the same erf), and in bfloat16 closer to float32 (one
rounding instead of two).

This uses the same two oneDNN operators that ``torch.compile`` emits for a frozen CPU model
(``mkldnn::_reorder_linear_weight`` and ``mkldnn::_linear_pointwise``, with its unary post-ops), without
compiling anything.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

log = logging.getLogger(__name__)


def onednn_linear_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear operators (x86 and ARM CPU builds do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


# oneDNN post-op (attr, algorithm) of each activation it computes as torch does (float32 within 5e-7, measured).
_ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""),
                       "silu": ("swish", "")}


class PackedLinear(torch.nn.Module):
    """``y = activation(x @ weight.T + bias)`` with ``weight`` (out, in) held in oneDNN's packed layout.

    ``activation``: None, or a key of ``_ONEDNN_ACTIVATIONS`` computed by oneDNN on the output as it is made.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.activation = activation
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attr, algorithm = _ONEDNN_ACTIVATIONS[self.activation] if self.activation else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, attr, [], algorithm)

    def extra_repr(self) -> str:
        fused = f", activation={self.activation}" if self.activation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{fused}"


# The MLP modules whose forward is ``activation(linear(x))``: class name -> (linear, activation) attributes.
_MLP_PARTS = {"BertIntermediate": ("dense", "intermediate_act_fn"), "GPT2MLP": ("c_fc", "act"),
              "CLIPMLP": ("fc1", "activation_fn")}


def fusable_activation(module: torch.nn.Module) -> str | None:
    """The ``_ONEDNN_ACTIVATIONS`` key of activation module ``module``, or None when oneDNN cannot compute it
    exactly as it does (CLIP's quick_gelu, transformers' Python-written variants, anything unknown)."""
    name = type(module).__name__
    act = getattr(module, "act", None)
    if name == "GELUActivation" and act is torch.nn.functional.gelu:
        return "gelu"
    if name == "NewGELUActivation" or (name == "GELUTanh" and getattr(act, "func", None) is torch.nn.functional.gelu
                                       and act.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    if type(module) is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if type(module) is torch.nn.ReLU:
        return "relu"
    if type(module) is torch.nn.SiLU or name == "SiLUActivation":
        return "silu"
    return None


def _fuse_mlp_activation(mlp: torch.nn.Module) -> bool:
    """Give ``mlp``'s first linear layer (already a :class:`PackedLinear`) its activation; True if fused."""
    linear_name, act_name = _MLP_PARTS.get(type(mlp).__name__, (None, None))
    linear, act = getattr(mlp, linear_name or "", None), getattr(mlp, act_name or "", None)
    if not isinstance(linear, PackedLinear) or linear.activation or act is None:
        return False
    activation = fusable_activation(act)
    if activation is None:
        return False
    linear.activation = activation
    setattr(mlp, act_name, torch.nn.Identity())
    return True


def _as_linear_weight(module: torch.nn.Module, any_dtype: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of a packable linear layer on the CPU (of any dtype with ``any_dtype``), or None
    for any other module."""
    if isinstance(module, torch.nn.Linear):
        weight = module.weight
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2's linear, weight stored (in, out)
        weight = module.weight.t()
    else:
        return None
    if weight.device.type != "cpu" or not (any_dtype or weight.dtype in packable_dtypes()):
        return None
    return weight, module.bias


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN runs here: float32 always, bfloat16 where the CPU has AVX512-BF16 or AMX
    (elsewhere oneDNN would emulate it, slower than float32)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def bfloat16_linear_speedup(in_features: int, out_features: int, tokens: int = 512, repeats: int = 5) -> float:
    """How many times faster a packed (tokens, in) x (in, out) linear layer runs in bfloat16 than in float32
    on this CPU, with this process's threads: the median of ``repeats`` timings of each (tens of ms in all).

    AVX512-BF16 alone does not make bfloat16 fast: its dot-product instruction does as many flops a cycle as
    two float32 FMA units do on an Intel Xeon, and oneDNN's bfloat16 kernels there ran 0.58x float32 (80.9
    against 143.8 GFLOP/s, 2,048 tokens, one core); AMX, or an AMD EPYC Zen 4, runs them 2x or more faster than float32.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    x = torch.randn(tokens, in_features, generator=generator)
    seconds = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            layer, inputs = PackedLinear(weight.to(dtype), None), x.to(dtype)
            layer(inputs)  # oneDNN builds its kernel on the first call
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                layer(inputs)
                times.append(time.perf_counter() - started)
            seconds[dtype] = statistics.median(times)
    return seconds[torch.float32] / seconds[torch.bfloat16]


def warn_if_bfloat16_is_slow(dtype: torch.dtype, model: torch.nn.Module | None = None,
                             min_speedup: float = 1.0) -> bool:
    """Log a warning (and return True) when ``dtype`` is bfloat16 and this CPU runs it no faster than float32.

    Without native kernels (no AVX512-BF16 or AMX) torch emulates bfloat16: on an AVX2-only AMD EPYC a
    MiniLM-sized linear layer ran 7x slower than in float32 (6.9 against 49 GFLOP/s on one core). With them,
    the speed-up of the model's widest linear layer is measured (:func:`bfloat16_linear_speedup`) and
    compared with ``min_speedup``.
    """
    if dtype != torch.bfloat16:
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("encoder.dtype: bfloat16 on a CPU without AVX512-BF16 or AMX: torch emulates bfloat16 here, "
                    "several times slower than float32; use dtype: float32 (or auto) on this CPU")
        return True
    shape = _widest_linear(model) if model is not None else (384, 1536)
    speedup = bfloat16_linear_speedup(*shape)
    if speedup >= min_speedup:
        log.info("encoder.dtype: bfloat16 linear layers run %.2fx float32 on this CPU (%d x %d, measured)",
                 speedup, *shape)
        return False
    log.warning("encoder.dtype: bfloat16 runs the linear layers at %.2fx the speed of float32 on this CPU "
                "(measured on a %d x %d layer: AVX512-BF16 without AMX gains nothing over float32 on some CPUs); "
                "dtype: float32 (or auto) is faster here", speedup, *shape)
    return True


def _widest_linear(model: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of ``model``'s linear layer with the most weights (384 x 1536 for MiniLM)."""
    shapes = [tuple(found[0].shape[::-1]) for module in model.modules()
              if (found := _as_linear_weight(module, any_dtype=True)) is not None]
    return max(shapes, key=lambda s: s[0] * s[1], default=(384, 1536))


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every float32 (or, on a CPU with native bfloat16, bfloat16) CPU linear layer of ``model`` (in
    place) by a :class:`PackedLinear`, with the MLPs' activations fused in; return how many linear layers.

    For inference only: the packed layers have no trainable parameters. A build without the oneDNN operators
    leaves the model as it is (and says so in the log).
    """
    if not onednn_linear_available():
        log.warning("torch %s has no oneDNN linear operators: linear layers stay on torch's own kernels",
                    torch.__version__)
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            found = _as_linear_weight(child)
            if found is not None:
                setattr(parent, name, PackedLinear(*found))
                replaced += 1
    fused = sum(_fuse_mlp_activation(module) for module in list(model.modules()))
    log.debug("packed %d linear layers, %d with their activation fused", replaced, fused)
    return replaced
