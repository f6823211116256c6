"""Continuous batching: the scheduler decides what runs next, the runner runs it.

The event loop is the single owner of the queue state; tokenization and forward passes
run on their own threads so that they overlap each other and the transport.
"""
