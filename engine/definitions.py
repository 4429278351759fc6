"""Step definitions: what ``@engine.step(...)`` registers.

The handler's signature is the input schema: every parameter after the context becomes a
field of a pydantic model (annotation and default kept); the return annotation validates the
output. Keys of the input that no parameter names are kept in ``ctx.input_data`` but not
passed to the handler, so a DAG node can read the flow's whole input.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from stepsource.aggregates.values import JSON, JSONObject, to_json, to_json_object
from stepsource.engine.arguments import check_priority
from stepsource.errors import InputValidationError, StateValueError, UnknownStepError, UsageError

if TYPE_CHECKING:
    import pydantic

__all__ = [
    "Durability",
    "Handler",
    "RetryPolicy",
    "StepDefinition",
    "build_definition",
    "check_durability",
    "lookup",
]

Handler = Callable[..., Awaitable[Any]] | Callable[..., Any]

Durability = Literal["boundary", "each"]
"""When a handler's deterministic operations are made durable: at the next side-effect
boundary (``"boundary"``, the default) or each on its own commit (``"each"``)."""


def check_durability(value: object, *, step_id: str | None = None) -> Durability:
    """``value`` if it is a durability mode, else UsageError."""
    if value == "boundary":
        return "boundary"
    if value == "each":
        return "each"
    raise UsageError(
        f"durability must be one of {', '.join(map(repr, get_args(Durability)))}, not {value!r}",
        step_id=step_id,
        hint='"boundary" commits at side effects (the default); "each" commits every operation',
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait before attempt n+1: ``initial * backoff**(n-1)``, capped at ``maximum``.

    ``non_retryable`` names exception types (classes or their names) that fail the step at
    once whatever ``max_retries`` says.
    """

    initial: float = 1.0
    backoff: float = 2.0
    maximum: float = 60.0
    non_retryable: tuple[type[BaseException] | str, ...] = ()
    #: tries of a ``ctx.do`` body, the first included (None: 3); a step's attempts are
    #: bounded by its ``max_retries`` instead
    maximum_attempts: int | None = None
    #: spread of each ``ctx.do`` backoff, a fraction in [0, 1]: the delay is scaled by a
    #: factor in [1 - jitter, 1 + jitter] derived from the execution, the name and the try
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("initial", "backoff", "maximum", "jitter"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise UsageError(
                    f"RetryPolicy.{name} must be a finite number >= 0, not {value!r}",
                    hint="Give seconds as an int or a float",
                )
        kinds = self.non_retryable
        if not isinstance(kinds, tuple | list) or not all(
            isinstance(k, str) or (isinstance(k, type) and issubclass(k, BaseException))
            for k in kinds
        ):
            raise UsageError(
                f"RetryPolicy.non_retryable must be a tuple of exception classes or their "
                f"names, not {kinds!r}",
                hint='Write non_retryable=(ValueError,) or ("ValueError",) (a tuple, even of one)',
            )
        if self.backoff < 1:
            raise UsageError("RetryPolicy.backoff must be >= 1")
        if self.jitter > 1:
            raise UsageError("RetryPolicy.jitter must be a fraction in [0, 1]")
        attempts = self.maximum_attempts
        if attempts is not None and (
            isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1
        ):
            raise UsageError(f"RetryPolicy.maximum_attempts must be an int >= 1, not {attempts!r}")

    def delay_seconds(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure (1 = the first): capped
        at ``maximum`` however many failures (a power past the float range is the cap)."""
        exponent = max(failed_attempts - 1, 0)
        if self.initial == 0:
            return 0.0
        try:
            delay = self.initial * self.backoff**exponent
        except OverflowError:
            return float(self.maximum)
        return float(min(delay, self.maximum))

    def is_retryable(self, error: BaseException) -> bool:
        for kind in self.non_retryable:
            if isinstance(kind, str):
                if any(k.__name__ == kind for k in type(error).__mro__):
                    return False
            elif isinstance(error, kind):
                return False
        return True

    def to_json(self) -> JSONObject:
        names: list[JSON] = [k if isinstance(k, str) else k.__name__ for k in self.non_retryable]
        return {
            "initial": self.initial,
            "backoff": self.backoff,
            "maximum": self.maximum,
            "non_retryable": names,
        }


def handler_code_hash(handler: Callable[..., Any]) -> str:
    """The first 16 hex digits of a SHA-256 over the handler's source (or its code)."""
    target = inspect.unwrap(handler)
    try:
        text = inspect.getsource(target).encode("utf-8", "surrogatepass")
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        text = b"" if code is None else code.co_code + repr(code.co_consts).encode()
    return hashlib.sha256(text).hexdigest()[:16]


@dataclass(frozen=True)
class StepDefinition:
    """A registered step: its handler, descriptive fields, policies and validators."""

    step_id: str
    version: str
    handler: Handler
    display_name: str | None = None
    description: str | None = None
    max_retries: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None
    priority: int = 0
    optional: bool = False
    config: JSONObject = field(default_factory=dict)
    compatible_with: tuple[str, ...] = ()
    durability: Durability | None = None
    """This step's durability mode; None: the engine's."""
    flow: bool = False
    """A DAG template (``engine.dag``): its executions are flows with their own flow id."""
    nodes: JSONObject | None = None
    """A DAG's declared nodes (name -> step, depends_on, optional), recorded with each run of
    it, so the UI draws the whole graph: the nodes not started too, and every dependency."""
    sync: bool = False
    """A plain ``def`` handler: it runs in a worker thread (:mod:`.sync_handlers`)."""
    """Older handler versions whose unfinished attempts this version may resume by replay."""
    migrate_input: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
    """Brings a stored input written for an older signature to the current one (a new
    required field's value, a renamed field); applied when an execution's recorded input is
    validated for a run, never to a new start's input."""
    input_model: type[pydantic.BaseModel] | None = None
    """The handler's parameters as a pydantic model; None for a handler that takes only the
    context, which then needs no model (:attr:`model` builds the empty one when asked): a
    worker running only such steps never imports pydantic's schema machinery, about 9 MB of
    its resident memory."""
    output_adapter: pydantic.TypeAdapter[Any] | None = None
    parameters: tuple[str, ...] = ()

    def can_resume(self, recorded_version: str) -> bool:
        return recorded_version in (self.version, *self.compatible_with)

    @functools.cached_property
    def code_hash(self) -> str:
        """A hash of the handler's code: its source text where Python has it, else its
        bytecode and constants. Workers publish it with the definition and record it when
        they park an execution, so a worker with other code can tell it may resume it."""
        return handler_code_hash(self.handler)

    def snapshot(self) -> JSONObject:
        """The definition as recorded in StepScheduled (the record's definition snapshot)."""
        return {
            "id": self.step_id,
            "version": self.version,
            "display_name": self.display_name,
            "description": self.description,
            "max_retries": self.max_retries,
            "retry": self.retry.to_json(),
            "timeout": self.timeout,
            "priority": self.priority,
            "optional": self.optional,
            "config": self.config,
            "flow": self.flow,
            **({} if self.nodes is None else {"nodes": self.nodes}),
        }

    @functools.cached_property
    def recorded_snapshot(self) -> JSONObject:
        """:meth:`snapshot` walked into strict JSON once for every start: each StepScheduled
        of this definition records this one object (nothing changes a recorded value, and
        what reads one out copies it)."""
        return to_json_object(self.snapshot(), what="definition", step_id=self.step_id)

    def input_schema(self) -> JSONObject:
        if self.input_model is None:
            return empty_input_schema(self.step_id)
        schema = self.input_model.model_json_schema()
        return to_json_object(schema, what="input schema", step_id=self.step_id)

    @functools.cached_property
    def model(self) -> type[pydantic.BaseModel]:
        """The input model: :attr:`input_model`, or for a handler that takes only the context
        the empty model (built when first asked for)."""
        if self.input_model is not None:
            return self.input_model
        return input_model(self.step_id, {})

    def validate_input(
        self, data: Mapping[str, Any], *, execution_id: str | None = None, stored: bool = False
    ) -> pydantic.BaseModel:
        """The input as the handler's parameters; ``stored``: an execution's recorded input,
        passed through ``migrate_input`` first."""
        import pydantic  # imported already by define for any step with parameters

        if stored and self.migrate_input is not None:
            data = migrated_input(self.migrate_input, data, self.step_id, execution_id)
        try:
            return self.model.model_validate(dict(data))
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'input'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InputValidationError(
                f"input does not match the handler's signature: {problems}",
                execution_id=execution_id,
                step_id=self.step_id,
                hint=f"Expected fields: {', '.join(self.parameters) or 'none'}",
            ) from None

    def handler_kwargs(self, validated: pydantic.BaseModel) -> dict[str, Any]:
        return {name: getattr(validated, name) for name in self.parameters}

    def input_kwargs(
        self, data: Mapping[str, Any], *, execution_id: str | None = None, stored: bool = False
    ) -> dict[str, Any]:
        """:meth:`validate_input` as the handler's keyword arguments, what the engine checks
        and passes; a handler that takes only the context needs no model (nor pydantic):
        any input is valid for it, its keys kept in ``ctx.input_data``."""
        if self.input_model is None:
            if stored and self.migrate_input is not None:  # a failing migration still says so
                migrated_input(self.migrate_input, data, self.step_id, execution_id)
            return {}
        validated = self.validate_input(data, execution_id=execution_id, stored=stored)
        return self.handler_kwargs(validated)

    def input_with_defaults(
        self, data: Mapping[str, Any], *, execution_id: str | None = None
    ) -> dict[str, Any]:
        """A recorded input as the handler sees it: migrated, the parameters it leaves out
        at their defaults (as Python values), the keys that name no parameter kept (what a
        concurrency key reads); InputValidationError if it does not fit."""
        if self.input_model is None:
            if self.migrate_input is not None:
                data = migrated_input(self.migrate_input, data, self.step_id, execution_id)
            return dict(data)
        validated = self.validate_input(data, execution_id=execution_id, stored=True)
        # python mode: a default JSON cannot hold (bytes, an object) is no reason to refuse
        return {**data, **validated.model_dump(mode="python")}

    def validate_output(self, value: Any, *, execution_id: str) -> Any:
        """The returned value as the record takes it: validated against the return
        annotation and dumped in its JSON mode, or the value itself for a handler without
        one (:meth:`StepExecution.complete` walks it once into strict JSON, refusing what is
        not with the same :class:`StateValueError`).

        An annotated value must itself be strict JSON (or pydantic models), as inputs and
        state must: the annotation's JSON serialisation would otherwise turn a datetime into
        a str."""
        if self.output_adapter is None:
            return value
        to_json(value, what="output", execution_id=execution_id, step_id=self.step_id)
        import pydantic  # imported by define for a typed return

        adapter = self.output_adapter
        try:
            # a model instance passes as it is: one changed after it was built (``r.total =
            # "12,50"``) is caught by validating what the record would hold, as result() will
            dumped = adapter.dump_python(
                adapter.validate_python(value), mode="json", warnings=False
            )
            adapter.validate_python(dumped)
        except pydantic.ValidationError as exc:
            raise StateValueError(
                f"the handler's return value does not match its annotation: {exc}",
                execution_id=execution_id,
                step_id=self.step_id,
                hint="Return a value of the annotated type",
            ) from None
        return dumped


def lookup(
    definitions: Mapping[str, StepDefinition],
    step_id: str,
    *,
    execution_id: str | None = None,
    doing: str = "starting it",
) -> StepDefinition:
    """The registered definition of ``step_id``, or UnknownStepError naming what is (and
    the execution that needs it, ``doing`` what)."""
    try:
        return definitions[step_id]
    except KeyError:
        known = ", ".join(sorted(definitions)) or "none"
        raise UnknownStepError(
            f"no step {step_id!r} is registered on this engine (registered: {known})",
            execution_id=execution_id,
            step_id=step_id,
            hint=f"Import the module that defines the step before {doing}",
        ) from None


def migrated_input(
    migrate: Callable[[dict[str, Any]], Mapping[str, Any]],
    data: Mapping[str, Any],
    step_id: str,
    execution_id: str | None,
) -> Mapping[str, Any]:
    """``migrate(copy of data)``; its failure is an InputValidationError naming the step."""
    try:
        result = migrate(copy.deepcopy(dict(data)))
    except Exception as error:  # why: the author's function; reported with the step
        raise InputValidationError(
            f"migrate_input raised {type(error).__name__}: {error}",
            execution_id=execution_id,
            step_id=step_id,
            hint="Make migrate_input accept every input shape still stored",
        ) from error
    if not isinstance(result, Mapping):
        raise InputValidationError(
            f"migrate_input returned {type(result).__name__}, not a mapping",
            execution_id=execution_id,
            step_id=step_id,
            hint="Return the input as a dict of fields",
        )
    return result


def build_definition(
    handler: Handler,
    step_id: str,
    version: str,
    *,
    localns: Mapping[str, Any] | None = None,
    **options: Any,
) -> StepDefinition:
    """Inspect ``handler`` and build its definition, refusing signatures we cannot honour."""
    sync = not inspect.iscoroutinefunction(handler)
    if sync and (
        not inspect.isfunction(handler)
        or inspect.isgeneratorfunction(handler)
        or inspect.isasyncgenfunction(handler)
    ):
        name = getattr(handler, "__qualname__", repr(handler))
        raise UsageError(
            f"the handler {name} must be an async def or a plain def function",
            step_id=step_id,
            hint="Declare it as `async def handler(ctx, ...)`, or `def handler(ctx, ...)` to "
            "run it in a worker thread",
        )
    if not isinstance(step_id, str) or not step_id:
        raise UsageError("a step id must be a non-empty str")
    if not isinstance(version, str) or not version:
        raise UsageError("a step version must be a non-empty str", step_id=step_id)
    try:
        hints = inspect.get_annotations(
            handler, eval_str=True, locals=dict(localns) if localns else None
        )
    except NameError as exc:
        raise UsageError(
            f"cannot resolve the annotations of {handler.__qualname__}: {exc}",
            step_id=step_id,
            hint="Import every type named in the handler's annotations at module level",
        ) from None
    params = list(inspect.signature(handler).parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise UsageError(
            f"the handler {handler.__qualname__} must take the StepContext as first parameter",
            step_id=step_id,
        )
    first = hints.get(params[0].name)
    if isinstance(first, type) and (
        issubclass(first, _INPUT_TYPES)
        or any(
            c.__name__ == "BaseModel" and c.__module__.startswith("pydantic") for c in first.__mro__
        )
    ):
        raise UsageError(
            f"the handler {handler.__qualname__} takes {params[0].name}: {first.__name__} "
            "first, where the StepContext goes",
            step_id=step_id,
            hint=f"Add the context before the inputs: `(ctx, {params[0].name}: "
            f"{first.__name__}, ...)`",
        )
    fields: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise UsageError(
                f"the handler {handler.__qualname__} takes *{p.name}; name each input instead",
                step_id=step_id,
            )
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    model = input_model(step_id, fields) if fields else None
    returns = hints.get("return", inspect.Signature.empty)
    # strict JSON needs no adapter: the value is checked by to_json (and pydantic cannot
    # build a schema for the recursive JSON alias)
    untyped = (inspect.Signature.empty, Any, None, type(None), JSON, JSONObject)
    adapter = None if returns in untyped else output_adapter(returns)
    check_step_options(options, step_id)
    config = to_json_object(options.pop("config", None) or {}, what="config", step_id=step_id)
    if options.get("durability") is not None:
        options["durability"] = check_durability(options["durability"], step_id=step_id)
    return StepDefinition(
        step_id=step_id,
        version=version,
        handler=handler,
        input_model=model,
        output_adapter=adapter,
        parameters=tuple(fields),
        config=config,
        sync=sync,
        **options,
    )


#: the most retries a step may ask for (a retry count past this is a mistake, not a policy)
MAX_RETRIES = 10**9


def check_step_options(options: dict[str, Any], step_id: str) -> None:
    """Refuse, at registration, option values a step could not use: each would otherwise
    fail later and far away (starting the pool, at ``engine.start``, in every execution),
    often as an error that is not a StepsourceError. ``compatible_with`` becomes a tuple."""

    def refuse(message: str, hint: str) -> None:
        raise UsageError(message, step_id=step_id, hint=hint)

    for name in ("display_name", "description"):
        if options.get(name) is not None and not isinstance(options[name], str):
            refuse(f"{name} must be a str or None, not {options[name]!r}", f"Pass {name}='...'")
    retries = options.get("max_retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        refuse(
            f"max_retries must be an int from 0 to {MAX_RETRIES:,}, not {retries!r}",
            "Count the retries after the first attempt (0: none)",
        )
    retry = options.get("retry")
    if retry is not None and not isinstance(retry, RetryPolicy):
        refuse(
            f"retry must be a RetryPolicy, not {retry!r}",
            "Write retry=ss.RetryPolicy(initial=1.0, backoff=2.0, maximum=60.0)",
        )
    timeout = options.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        refuse(
            f"timeout must be a number of seconds > 0 or None, not {timeout!r}",
            "Pass timeout=None for no time limit",
        )
    check_priority(options.get("priority", 0), step_id=step_id)
    if not isinstance(options.get("optional", False), bool):
        refuse(f"optional must be True or False, not {options['optional']!r}", "Pass a bool")
    config = options.get("config")
    if config is not None and not isinstance(config, Mapping):
        refuse(
            f"config must be a mapping of JSON values, not {type(config).__name__}",
            "Pass config={'key': value}",
        )
    compatible = options.get("compatible_with", ())
    if isinstance(compatible, str) or not all(
        isinstance(v, str) and v for v in _iterable(compatible)
    ):
        refuse(
            f"compatible_with must be a tuple of version strs, not {compatible!r}",
            'Write compatible_with=("1",) (a tuple, even of one)',
        )
    options["compatible_with"] = tuple(compatible)
    migrate = options.get("migrate_input")
    if migrate is not None and not callable(migrate):
        refuse(
            f"migrate_input must be a function of the stored input, not {migrate!r}",
            "Pass migrate_input=lambda data: {**data, 'new_field': default}",
        )


def _iterable(value: object) -> list[object]:
    """The items of a tuple, list or set; ``[None]`` (refused) for anything else."""
    return list(value) if isinstance(value, tuple | list | set | frozenset) else [None]


#: annotations of an input, never of the context: a handler whose first parameter has one
#: forgot the context (``async def handler(order_id: str)``)
_INPUT_TYPES = (str, int, float, bytes, dict, list, tuple, set)


def input_model(step_id: str, fields: Mapping[str, Any]) -> type[pydantic.BaseModel]:
    """The pydantic model of a handler's parameters (``fields``: name -> (type, default))."""
    import pydantic  # only steps that take inputs pay for its schema machinery

    return pydantic.create_model(
        _input_title(step_id),
        __config__=pydantic.ConfigDict(extra="ignore", arbitrary_types_allowed=False),
        **fields,
    )


def output_adapter(returns: Any) -> pydantic.TypeAdapter[Any]:
    """The adapter that validates a handler's output against its return annotation."""
    import pydantic  # only steps with a typed return pay for it

    return pydantic.TypeAdapter(returns)


def empty_input_schema(step_id: str) -> JSONObject:
    """The JSON Schema of a handler that takes only the context: what pydantic generates
    for :func:`input_model` with no fields, without building the model."""
    return {"properties": {}, "title": _input_title(step_id), "type": "object"}


def _input_title(step_id: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in step_id) + "_input"
