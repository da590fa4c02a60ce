"""Argument checks and dtype policy shared by the kernel launchers (plain Python, no Triton code)."""
import torch

from .tiles import INTERPRET

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_inputs(hidden, weight, bias, targets):
    """Shape, dtype and device checks that name the offending tensor; returns contiguous inputs."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden is on {hidden.device}")
    if hidden.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"hidden is on {hidden.device}: the Triton kernels need CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton kernels are defined"
        )
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must be [N, D] with N >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, D={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one dtype of bf16, fp16, fp32"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be [V={weight.shape[0]}] in {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be [N={hidden.shape[0]}] integers, got {tuple(targets.shape)} {targets.dtype}")
    return (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        targets.contiguous(),
    )


def token_vector(name, tensor, hidden):
    """lse or coef: [N] floats on hidden's device, returned as contiguous fp32."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape != hidden.shape[:1] or not tensor.dtype.is_floating_point:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a float tensor of shape [N={hidden.shape[0]}], got {shape}")
    if tensor.device != hidden.device:
        raise ValueError(f"{name} is on {tensor.device}, hidden is on {hidden.device}")
    return tensor.to(torch.float32).contiguous()


def dot_precision(dtype):
    """fp32 inputs follow torch's matmul precision (default "highest": true fp32, like the chunked twin)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # only consulted for fp32 operands
