"""Helpers for testing step handlers: crash_everywhere, strategies, fixtures."""
