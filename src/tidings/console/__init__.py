"""The web console (`tidings console`): streams, the live log, time travel, projections,
dead letters and traces in a browser, served on 127.0.0.1.

Needs the `console` extra (Starlette, uvicorn, Jinja2). `import tidings` never imports this
package; the CLI command does, when it runs.
"""

from __future__ import annotations

from tidings.console.app import create_app, new_token
from tidings.console.parts import AppParts, load_app

__all__ = ["AppParts", "create_app", "load_app", "new_token"]
