"""Raw data readers: the data policy's folders, Bliss scans and their Lima files, image
files, spectra, tomography scans and MX images. Raw files are opened read-only, with
HDF5 file locking off (Bliss may still be writing)."""
