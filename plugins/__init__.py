"""Connector plugins shipped with Tidegate, loaded through the ``tidegate`` entry points."""
