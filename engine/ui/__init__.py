"""The outbound-log page: an aiohttp app on ``serve --ui-port`` (``engine.ui.server``)
with its static assets in ``engine/ui/static`` (plain ES modules, no build step)."""
