"""pgreact: PostgreSQL table changes drive Python handlers.

The handler API::

    from service import Router, Event, Notification
"""

from service.events import Event, Notification
from service.router import Router

__all__ = ["Event", "Notification", "Router", "__version__"]

__version__ = "0.1.0"
