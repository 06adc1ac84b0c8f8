"""pgreact: PostgreSQL table changes drive Python handlers.

The handler API::

    from pgreact import Router, Event, Notification
"""

from pgreact.copy import copy_rows
from pgreact.events import Event, Notification
from pgreact.router import Router

__all__ = ["Event", "Notification", "Router", "__version__", "copy_rows"]

__version__ = "0.1.0"
