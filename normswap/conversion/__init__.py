"""Conversion: plan (norm-shift mapping) -> weights -> realisation -> verification."""

from .api import convert, plan_conversion
from .plan import ConversionPlan, NormMove, PlanError, StackPlan

__all__ = ["ConversionPlan", "NormMove", "PlanError", "StackPlan", "convert", "plan_conversion"]
