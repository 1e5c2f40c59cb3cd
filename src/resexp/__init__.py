"""resexp: reproduce the depth experiment of He et al. 2015 (CIFAR-10, section 4.2)."""

__version__ = "0.1.0"
