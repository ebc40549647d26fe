"""Offline scoring (`raykit score`) on Ray Data, and evaluation (`raykit evaluate`)."""
