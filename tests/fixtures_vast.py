"""Shared pytest fixtures (loaded by conftest.py via pytest_plugins)."""
