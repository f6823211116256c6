"""Transport security (TLS, mTLS) and API keys."""
