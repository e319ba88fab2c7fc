"""The kiln version. Engines record it; a different version refuses to load them."""

__version__ = "0.1.0"
