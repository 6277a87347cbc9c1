"""The loss ops, one file each: ``subinterval_loss``, ``dmd_loss``, ``renoise`` (see ``dispatch`` for backends)."""
from .dmd_loss import dmd_loss
from .renoise import renoise
from .subinterval_loss import subinterval_loss

__all__ = ["subinterval_loss", "dmd_loss", "renoise"]
