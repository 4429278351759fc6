"""stepsource: durable step execution for Python services on an event-sourced log.

``import stepsource as ss`` gives the whole public API::

    engine = ss.Engine("sqlite:///steps.db")

    @engine.step("orders.charge", version="1")
    async def charge(ctx: ss.StepContext, order_id: str) -> dict: ...
"""

import stepsource._layout  # noqa: F401 - first: finds the subpackages in a source checkout
from stepsource.aggregates.events import register_event_class as register_event_class
from stepsource.aggregates.secrets import Secret as Secret
from stepsource.aggregates.values import JSON as JSON
from stepsource.aggregates.values import JSONObject as JSONObject
from stepsource.asgi import lifespan as lifespan
from stepsource.engine.children import ChildHandle as ChildHandle
from stepsource.engine.context import StepContext as StepContext
from stepsource.engine.dag import Node as Node
from stepsource.engine.definitions import RetryPolicy as RetryPolicy
from stepsource.engine.definitions import StepDefinition as StepDefinition
from stepsource.engine.engine import Engine as Engine
from stepsource.engine.handle import ExecutionHandle as ExecutionHandle
from stepsource.engine.index_stats import ExecutionStats as ExecutionStats
from stepsource.engine.interceptors import AttemptInfo as AttemptInfo
from stepsource.engine.interceptors import AttemptOutcome as AttemptOutcome
from stepsource.engine.interceptors import CommitInfo as CommitInfo
from stepsource.engine.interceptors import Interceptor as Interceptor
from stepsource.engine.interceptors import MessageInfo as MessageInfo
from stepsource.engine.interceptors import StartInfo as StartInfo
from stepsource.engine.interceptors import SubStepInfo as SubStepInfo
from stepsource.engine.interceptors import WaitInfo as WaitInfo
from stepsource.engine.readmodels import RebuildReport as RebuildReport
from stepsource.engine.sagas import Saga as Saga
from stepsource.engine.schedules import ScheduleEntry as ScheduleEntry
from stepsource.engine.schedules import ScheduleHandle as ScheduleHandle
from stepsource.engine.schedules import ScheduleInfo as ScheduleInfo
from stepsource.engine.sync_handlers import SyncSaga as SyncSaga
from stepsource.engine.sync_handlers import SyncStepContext as SyncStepContext
from stepsource.engine.verify import Divergence as Divergence
from stepsource.engine.version_view import VersionView as VersionView
from stepsource.errors import BackendUnavailableError as BackendUnavailableError
from stepsource.errors import ChildFailedError as ChildFailedError
from stepsource.errors import CompensationError as CompensationError
from stepsource.errors import CorruptLogError as CorruptLogError
from stepsource.errors import InputValidationError as InputValidationError
from stepsource.errors import LimitExceededError as LimitExceededError
from stepsource.errors import NonDeterminismError as NonDeterminismError
from stepsource.errors import OutputValidationError as OutputValidationError
from stepsource.errors import ResultTimeout as ResultTimeout
from stepsource.errors import StateValueError as StateValueError
from stepsource.errors import StepCancelledError as StepCancelledError
from stepsource.errors import StepFailedError as StepFailedError
from stepsource.errors import StepsourceError as StepsourceError
from stepsource.errors import SubStepFailedError as SubStepFailedError
from stepsource.errors import SubStepTimeoutError as SubStepTimeoutError
from stepsource.errors import UnknownCheckpointError as UnknownCheckpointError
from stepsource.errors import UnknownEventError as UnknownEventError
from stepsource.errors import UnknownExecutionError as UnknownExecutionError
from stepsource.errors import UnknownQueryError as UnknownQueryError
from stepsource.errors import UnknownServiceError as UnknownServiceError
from stepsource.errors import UnknownStepError as UnknownStepError
from stepsource.errors import UpdateFailedError as UpdateFailedError
from stepsource.errors import UsageError as UsageError
from stepsource.errors import VersionConflictError as VersionConflictError
from stepsource.errors import WaitTimeout as WaitTimeout
from stepsource.projections.models import CheckpointInfo as CheckpointInfo
from stepsource.projections.models import ExecutionAttempt as ExecutionAttempt
from stepsource.projections.models import ExecutionInfo as ExecutionInfo
from stepsource.projections.models import ExecutionMetadata as ExecutionMetadata
from stepsource.projections.models import HistoryEntry as HistoryEntry
from stepsource.projections.models import StepMetadata as StepMetadata
from stepsource.projections.models import StepRecord as StepRecord
from stepsource.projections.models import WorkflowState as WorkflowState
from stepsource.projections.summaries import ExecutionSummary as ExecutionSummary

__version__ = "0.1.0"

__all__ = [
    "JSON",
    "AttemptInfo",
    "AttemptOutcome",
    "BackendUnavailableError",
    "CheckpointInfo",
    "ChildFailedError",
    "ChildHandle",
    "CommitInfo",
    "CompensationError",
    "CorruptLogError",
    "Divergence",
    "Engine",
    "ExecutionAttempt",
    "ExecutionHandle",
    "ExecutionInfo",
    "ExecutionMetadata",
    "ExecutionStats",
    "ExecutionSummary",
    "HistoryEntry",
    "InputValidationError",
    "Interceptor",
    "JSONObject",
    "LimitExceededError",
    "MessageInfo",
    "Node",
    "NonDeterminismError",
    "OutputValidationError",
    "RebuildReport",
    "ResultTimeout",
    "RetryPolicy",
    "Saga",
    "ScheduleEntry",
    "ScheduleHandle",
    "ScheduleInfo",
    "Secret",
    "StartInfo",
    "StateValueError",
    "StepCancelledError",
    "StepContext",
    "StepDefinition",
    "StepFailedError",
    "StepMetadata",
    "StepRecord",
    "StepsourceError",
    "SubStepFailedError",
    "SubStepInfo",
    "SubStepTimeoutError",
    "SyncSaga",
    "SyncStepContext",
    "UnknownCheckpointError",
    "UnknownEventError",
    "UnknownExecutionError",
    "UnknownQueryError",
    "UnknownServiceError",
    "UnknownStepError",
    "UpdateFailedError",
    "UsageError",
    "VersionConflictError",
    "VersionView",
    "WaitInfo",
    "WaitTimeout",
    "WorkflowState",
    "lifespan",
    "register_event_class",
]
