"""The Insider sandbox: a stand-in for Insider's UCD API (``server``) with its own,
independent reading of Insider's validation rules (``rules``), for tests, the bench and
the demo. Not part of the connector: the connector never imports it."""

from plugins.insider.sandbox.server import (
    RunningSandbox,
    Sandbox,
    SandboxConfig,
    create_app,
    run_sandbox,
    start_sandbox,
)

__all__ = [
    "RunningSandbox",
    "Sandbox",
    "SandboxConfig",
    "create_app",
    "run_sandbox",
    "start_sandbox",
]
