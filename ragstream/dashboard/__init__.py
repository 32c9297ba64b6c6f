"""The monitoring dashboard: `ragstream dashboard`, and a component of `ragstream up`.

Pages read the Iceberg audit and metric tables (no second store) and draw Plotly charts
with the plotly.js the `plotly` package ships, so the page works with no internet.
"""

from ragstream.dashboard.app import create_app

__all__ = ["create_app"]
