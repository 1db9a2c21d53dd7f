"""Batch jobs and the ``roiscribe`` command line."""
