"""adaskip-rag: a local LLM for retrieval pipelines that skips the sublayers it does not need (AdaSkip)."""

from .constrained import SchemaLimits
from .costs import CostModel
from .engine import AdaSkipEngine, GenerationResult
from .skipping import Probe, SkipPlan, Sublayer
from .stats import SkipStats

__all__ = [
    "AdaSkipEngine",
    "CostModel",
    "GenerationResult",
    "Probe",
    "SchemaLimits",
    "SkipPlan",
    "SkipStats",
    "Sublayer",
]
