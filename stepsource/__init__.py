"""stepsource: durable step execution on an event-sourced log."""

from stepsource.errors import *  # noqa: F403
