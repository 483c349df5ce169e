"""Durable HDF5 storage: files written under a temporary name and linked to their final one, never
replacing a file (hdf5), fsync of files and directories and checksums (durable), plain HDF5 attribute
values (attrs), and groups added to a written scan file without rewriting it (amend)."""
