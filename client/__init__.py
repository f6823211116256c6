"""The embedserve Python client (see the README's "Clients" section)."""
