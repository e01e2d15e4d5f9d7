"""agent: a supervisor that keeps an always-on AI agent gateway alive."""

__version__ = "0.1.0"
