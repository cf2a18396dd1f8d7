"""Infra of the VeCAF pipeline (see DESIGN.md)."""
