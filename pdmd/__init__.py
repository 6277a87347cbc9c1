"""pdmd: Phased Distribution Matching Distillation."""
from pdmd.core import objectives
from pdmd.core import schedules
from pdmd.core.schedules import get_schedule

__version__ = "0.1.0"
__all__ = ["objectives", "schedules", "get_schedule", "__version__"]
