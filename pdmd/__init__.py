"""pdmd: Phased Distribution Matching Distillation."""
from . import objectives, schedules
from .schedules import get_schedule

__version__ = "0.1.0"
__all__ = ["objectives", "schedules", "get_schedule", "__version__"]
