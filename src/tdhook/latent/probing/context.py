"""Compatibility path (tdhook 0.1): ``tdhook.latent.probing.context``."""

from ._probes import Probe
from ._probing import Probing

__all__ = ["Probe", "Probing"]
