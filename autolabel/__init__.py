"""autolabel: Warp-Refine label propagation for driving video.

This package holds what every layer shares: the error hierarchy (``errors``), the name
registry (``registry``), shared settings (``settings``) and the command line (``cli``). The
numerics live in ``models``, the Zarr store and dataset readers in ``storage``, Prefect
tasks in ``tasks`` and flows in ``flows``.
"""

__version__ = "0.1.0"
