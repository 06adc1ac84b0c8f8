"""Handler modules the process-level tests load through PGREACT_HANDLERS."""
