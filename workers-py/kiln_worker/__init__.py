"""Kiln's Python worker: runs generation requests from its agent over JSON lines on stdio."""

__version__ = "0.1.0"
