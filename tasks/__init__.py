"""Prefect tasks that move data, and the readers and writers they use.

Raw files are opened read-only (HDF5 file locking off, as Bliss may still be
writing); outputs are written under a temporary name and renamed when complete.
"""
