"""Float32 and bfloat16 linear layers run by oneDNN with their weights packed once, for CPU inference.

A transformer encoder's CPU time goes almost entirely to its linear layers. torch's x86 build sends float32
``nn.Linear`` to MKL's sgemm, and MKL, which picks its code path by CPU vendor, runs well below the machine's
peak on AMD processors: 85-145 GFLOP/s on 2 cores of the AMD EPYC (AVX-512) these benchmarks ran on, where
oneDNN, given a weight reordered once into its blocked layout, reached 165-205 for MiniLM's shapes (and 100
against MKL's 51 for 8-row batches). Both compute in float32; outputs agree to about 1e-6 relative.

On a CPU with AVX512-BF16 (or AMX) the same operators run bfloat16 weights and activations on the native
bfloat16 dot-product instructions, accumulating in float32: about 2.3x the float32 rate for MiniLM's shapes on
one core of the AMD EPYC above (64 against 28 GFLOP/s, measured with 2,048-token batches).

This uses the same two oneDNN operators that ``torch.compile`` emits for a frozen CPU model
(``mkldnn::_reorder_linear_weight`` and ``mkldnn::_linear_pointwise``), without compiling anything.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def onednn_linear_available() -> bool:
    """Whether this torch build has the oneDNN packed-linear operators (x86 and ARM CPU builds do)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(torch.nn.Module):
    """``y = x @ weight.T + bias`` with ``weight`` (out, in) held in oneDNN's packed layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()))
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _as_linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of a float32 linear layer on the CPU, or None for any other module."""
    if isinstance(module, torch.nn.Linear):
        weight = module.weight
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2's linear, weight stored (in, out)
        weight = module.weight.t()
    else:
        return None
    if weight.device.type != "cpu" or weight.dtype not in packable_dtypes():
        return None
    return weight, module.bias


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN runs here: float32 always, bfloat16 where the CPU has AVX512-BF16 or AMX
    (elsewhere oneDNN would emulate it, slower than float32)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def warn_if_bfloat16_is_emulated(dtype: torch.dtype) -> bool:
    """Log a warning (and return True) when ``dtype`` is bfloat16 on a CPU without native bfloat16 kernels,
    where torch emulates it: on an AVX2-only AMD EPYC a MiniLM-sized linear layer ran 7x slower in bfloat16
    than in float32 (6.9 against 49 GFLOP/s on one core)."""
    if dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    log.warning("encoder.dtype: bfloat16 on a CPU without AVX512-BF16 or AMX: torch emulates bfloat16 here, "
                "several times slower than float32; use dtype: float32 (or auto) on this CPU")
    return True


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every float32 (or, on a CPU with native bfloat16, bfloat16) CPU linear layer of ``model`` (in
    place) by a :class:`PackedLinear`; return how many.

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
    return replaced
