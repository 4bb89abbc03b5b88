"""The Braze sandbox: a stand-in for Braze's REST user endpoints (``server``) with its own
reading of Braze's rules (``rules``), for tests, the bench and the demo. It shares no code
with the connector: the connector never imports it, and it imports nothing of the
connector."""

from plugins.braze.sandbox.server import (
    BrazeSandbox,
    RunningBrazeSandbox,
    SandboxConfig,
    create_app,
    run_sandbox,
    start_sandbox,
)

__all__ = [
    "BrazeSandbox",
    "RunningBrazeSandbox",
    "SandboxConfig",
    "create_app",
    "run_sandbox",
    "start_sandbox",
]
