"""Envoy in front of N embedserve replicas: the config renderer."""
