"""Device support: what the runtime runs on and what it costs there."""
