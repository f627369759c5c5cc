"""`pedseg batch`: many sessions through the one pipeline call, as independent Dask tasks (README: Batches)."""
