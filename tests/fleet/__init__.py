"""Fleet service tests: settings, auth, CA, registry, enrollment, audit, ingest."""
