"""Writing results: NeXus files published atomically (temporary name, then rename) and
quick-look figures."""
