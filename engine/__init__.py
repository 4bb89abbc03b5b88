"""Tidegate engine: the generic outbound-sync core. It never imports ``plugins``."""

__version__ = "0.2.0.dev0"
