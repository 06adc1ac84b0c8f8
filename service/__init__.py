"""pgreact: PostgreSQL table changes drive Python handlers.

The handler API::

    from service import Router, Event, Notification
"""

from service.copy import copy_rows
from service.events import Event, Notification
from service.router import Router

__all__ = ["Event", "Notification", "Router", "__version__", "copy_rows"]

__version__ = "0.1.0"
