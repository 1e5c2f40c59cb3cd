"""resexp: reproduce the depth experiment of He et al. 2015 (CIFAR-10, section 4.2)."""

import os

# torch's OpenMP threads spin for a few microseconds when they run out of work, then sleep: GNU
# OpenMP's default is about a hundred times longer, which spends a second torch process's time on the
# same cores (another sweep, resexp analyze) spinning. A short spin keeps a lone run as fast (the next
# operation comes within microseconds). OpenMP reads this when torch is first imported, so it is set
# here, before any module of the package imports torch; a wait policy or spin count the user set wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
