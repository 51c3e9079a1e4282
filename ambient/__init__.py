"""ambient: a per-request user execution context for ASGI applications.

Every request gets its own immutable :class:`UserExecutionContext`, bound in a
:class:`contextvars.ContextVar`, and a :class:`Scope` from which per-user components are
created lazily and cleaned up when the request ends.
"""

from ambient._accessors import Accessor, accessor, proxy, resolve, resolve_sync
from ambient._binding import (
    bind_context,
    current_context_or_none,
    current_scope,
    detached,
    get_current_context,
    wrap,
)
from ambient._context import UserExecutionContext, UserRef
from ambient._observe import ComponentEvent, Observer, add_observer
from ambient._provider import Lifetime
from ambient._registry import Registry, RegistryStats
from ambient._scope import Scope
from ambient.errors import (
    AmbientError,
    CleanupError,
    ContextSwitchError,
    InvalidContextError,
    NoActiveContextError,
    RegistryError,
    ResolutionError,
    ScopeClosedError,
)

__all__ = [
    "Accessor",
    "AmbientError",
    "CleanupError",
    "ComponentEvent",
    "ContextSwitchError",
    "InvalidContextError",
    "Lifetime",
    "NoActiveContextError",
    "Observer",
    "Registry",
    "RegistryError",
    "RegistryStats",
    "ResolutionError",
    "Scope",
    "ScopeClosedError",
    "UserExecutionContext",
    "UserRef",
    "accessor",
    "add_observer",
    "bind_context",
    "current_context_or_none",
    "current_scope",
    "detached",
    "get_current_context",
    "proxy",
    "resolve",
    "resolve_sync",
    "wrap",
]

__version__ = "0.1.0.dev0"
