"""Detection: residual/norm topology from torch.fx traces on the meta device."""

from .pipeline import inspect

__all__ = ["inspect"]
