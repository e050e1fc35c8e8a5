"""User-facing commands other than ``serve``: ``top`` (and the planning and measuring tools)."""
