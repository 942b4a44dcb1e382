"""``calypso portal``: the web portal of visiting users (issue #21, docs/portal.md).

A user signs in (LDAP or OpenID Connect, :mod:`calypso.registry.access`), browses the
proposals they are a member of (RAW_DATA and PROCESSED_DATA side by side), opens any
HDF5/NeXus file in h5web (its contents served by h5grove through the portal's
confinement check), follows their runs from the Prefect API, launches and reruns a
technique's flow as themselves, and exports results. Every action is recorded in the
catalogue.

- :mod:`.app`: the application (sessions, pages, errors);
- :mod:`.auth`: sign-in, the session's identity;
- :mod:`.paths`: every path from a URL, checked;
- :mod:`.browse`: the data browser; :mod:`.h5`: h5grove's endpoints, confined;
- :mod:`.runs`: the user's runs (Prefect API, filtered on the server by proposal);
- :mod:`.launch`: a technique's flow from its parameter form, reruns; :mod:`.saved`: saved
  flows; :mod:`.exports`: exports to object storage; :mod:`.audit`: the action record.
"""

from calypso.flows.portal.app import create_app

__all__ = ["create_app"]
