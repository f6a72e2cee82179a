"""The run page: live from the coordinator (:class:`Dashboard`), or a static ``report.html`` (:func:`write_report`)."""

from .page import page_data, render_page, write_report
from .server import Dashboard, History, parse_address

__all__ = ["Dashboard", "History", "page_data", "parse_address", "render_page", "write_report"]
