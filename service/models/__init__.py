"""Model adapters: what each model family needs (templates, pooling, scoring)."""
