"""One Prefect flow per technique, and the ``calypso`` command line."""
