"""Pure torch / numpy / OpenCV code: flow backends, warping, teacher, refiner, metrics.

Nothing in this package imports Prefect or zarr, so it runs anywhere torch does.
"""
