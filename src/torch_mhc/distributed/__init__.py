"""Scale-out on PyTorch's own distributed stack (torchrun, DeviceMesh, FSDP2, DDP, DCP).

The model stays free of parallel code: :func:`parallelize` takes a built ``DecoderLM`` and the
mesh from :class:`ParallelDims` and applies data parallelism (FSDP2 per block then the root, HSDP
on a 2-D mesh, or DDP); :mod:`torch_mhc.distributed.checkpoint` saves and loads through
``torch.distributed.checkpoint`` with a crash-safe commit.
"""

from torch_mhc.distributed.mesh import ParallelDims, global_rows, init_distributed
from torch_mhc.distributed.parallelize import parallelize

__all__ = ["ParallelDims", "global_rows", "init_distributed", "parallelize"]
