"""``tidegate demo``: the engine with every destination's sandbox (Insider and Braze),
sample mappings and traffic. A plugin of its own (entry point ``demo``), apart from the
connectors, since it shows them side by side."""
