"""Model backends: one interface, one module per provider, found through entry points."""
