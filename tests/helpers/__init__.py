"""Helpers shared by test folders (real-service launchers). Not installed."""
