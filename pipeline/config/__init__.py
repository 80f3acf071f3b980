"""Layered, validated settings: Dynaconf underneath, pydantic on top (see ``layers.py``)."""

from pipeline.config.loader import LayeredSettings, load_layered, load_settings
from pipeline.config.schema import Environment, Settings

__all__ = ["Environment", "LayeredSettings", "Settings", "load_layered", "load_settings"]
