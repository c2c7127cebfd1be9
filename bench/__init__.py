"""Load generation and measurement. Never imported by serving code."""
