"""The Braze connector: Antavo profile changes and events to Braze's ``/users/track``."""
