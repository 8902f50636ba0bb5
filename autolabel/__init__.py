"""autolabel: Warp-Refine label propagation for driving video.

This package holds what every layer shares: the error hierarchy (``errors``), the name
registry (``registry``), shared settings (``settings``), process set-up (``runtime``) and the
command line (``cli``). The numerics live in ``models``, the Zarr store and dataset readers in
``storage``, Prefect tasks in ``tasks`` and flows in ``flows``.
"""

from autolabel.runtime import prefer_passive_waits

__version__ = "0.1.0"

prefer_passive_waits()  # before torch is imported: OpenMP reads its wait policy once, on loading
