"""durable: crash-resumable asyncio workflows that need nothing but PostgreSQL."""

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

__all__ = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DefinitionError",
    "DurableError",
    "IllegalTransition",
    "NonRetryable",
    "RunCancelled",
    "RunFailed",
    "RunNotFound",
    "SerializationError",
    "WorkflowNotFound",
]
