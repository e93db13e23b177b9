"""Old import path of :mod:`one2345pp.models.recon` (the demo and the benchmarks import the reconstructor from here)."""

from ..models.recon import Reconstruction, Reconstructor

__all__ = ["Reconstruction", "Reconstructor"]
