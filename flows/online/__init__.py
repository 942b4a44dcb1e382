"""Processing during the experiment: ``calypso watch`` finds finished acquisitions in
RAW_DATA trees (:mod:`.acquisitions`, :mod:`.watch`) and announces them to Prefect;
``calypso serve`` (:mod:`.serve`) keeps a deployment per technique and saved flow that
those announcements start."""
