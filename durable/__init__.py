"""durable: crash-resumable asyncio workflows that need nothing but PostgreSQL."""

__version__ = "0.1.0"

from durable.client import LimitUsage
from durable.context import Context, LoopContext, SyncContext, SyncLoopContext
from durable.engine import Engine
from durable.errors import (
    ArgumentError,
    ArgumentTypeError,
    ChildFailed,
    ConfigurationError,
    DatabaseUnavailable,
    DefinitionChanged,
    DefinitionError,
    DurableError,
    IdempotencyConflict,
    IllegalTransition,
    NonRetryable,
    RunCancelled,
    RunFailed,
    RunNotFound,
    ScheduleNotFound,
    SerializationError,
    SignalTimeout,
    SwallowedDatabaseError,
    WorkerLost,
    WorkflowNotFound,
)
from durable.flow import Debounce, Limit
from durable.history import HistoryDrop, HistoryPartition
from durable.model import Attempt, JournalEntry, Run, RunStatus
from durable.operations import RunFilter
from durable.runtime.threads import SyncConnection
from durable.schedule import Schedule, ScheduleInfo
from durable.shapes import ShapeDiff
from durable.versions import CheckReport, StrandedRuns, UpgradeRefusal, UpgradeReport
from durable.workflow import Node, Step, Workflow, default_backoff, exponential

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "Attempt",
    "CheckReport",
    "ChildFailed",
    "ConfigurationError",
    "Context",
    "DatabaseUnavailable",
    "Debounce",
    "DefinitionChanged",
    "DefinitionError",
    "DurableError",
    "Engine",
    "HistoryDrop",
    "HistoryPartition",
    "IdempotencyConflict",
    "IllegalTransition",
    "JournalEntry",
    "Limit",
    "LimitUsage",
    "LoopContext",
    "Node",
    "NonRetryable",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunFilter",
    "RunNotFound",
    "RunStatus",
    "Schedule",
    "ScheduleInfo",
    "ScheduleNotFound",
    "SerializationError",
    "ShapeDiff",
    "SignalTimeout",
    "Step",
    "StrandedRuns",
    "SwallowedDatabaseError",
    "SyncConnection",
    "SyncContext",
    "SyncLoopContext",
    "UpgradeRefusal",
    "UpgradeReport",
    "WorkerLost",
    "Workflow",
    "WorkflowNotFound",
    "default_backoff",
    "exponential",
]
