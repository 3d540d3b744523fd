"""The encode stage: model loading, the forward pass, CPU kernels, the device, the per-shard stage."""
