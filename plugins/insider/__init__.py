"""The Insider connector: Antavo profiles and events to Insider's UCD upsert API."""
