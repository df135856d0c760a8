"""durable: crash-resumable asyncio workflows that need nothing but PostgreSQL."""

__version__ = "0.1.0"

from durable.context import Context, LoopContext
from durable.engine import Engine
from durable.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DefinitionError,
    DurableError,
    IllegalTransition,
    NonRetryable,
    RunCancelled,
    RunFailed,
    RunNotFound,
    SerializationError,
    WorkflowNotFound,
)
from durable.model import Attempt, JournalEntry, Run, RunStatus
from durable.workflow import Node, Step, Workflow, default_backoff, exponential

__all__ = [
    "Attempt",
    "ConfigurationError",
    "Context",
    "DatabaseUnavailable",
    "DefinitionError",
    "DurableError",
    "Engine",
    "IllegalTransition",
    "JournalEntry",
    "LoopContext",
    "Node",
    "NonRetryable",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunNotFound",
    "RunStatus",
    "SerializationError",
    "Step",
    "Workflow",
    "WorkflowNotFound",
    "default_backoff",
    "exponential",
]
