"""Figures and reports (matplotlib, offline HTML)."""
