"""Guardrail detectors: each finds one kind of risk in a text, behind one interface
(`Detector`), so production can route a rail to a bigger model without code changes."""
