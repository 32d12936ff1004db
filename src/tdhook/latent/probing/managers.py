"""Compatibility path (tdhook 0.1): ``tdhook.latent.probing.managers``."""

from ._probes import BilinearProbe, BilinearProbeManager, Probe, ProbeManager

__all__ = ["BilinearProbe", "BilinearProbeManager", "Probe", "ProbeManager"]
