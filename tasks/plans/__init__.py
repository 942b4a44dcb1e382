"""Planning a run before anything starts: the raw data, geometry and parameters checked
(one clear error otherwise), the work split into chunks, slabs or batches."""
