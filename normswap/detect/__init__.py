"""Detection: residual/norm topology from torch.fx traces on the meta device."""

from .inspect import inspect

__all__ = ["inspect"]
