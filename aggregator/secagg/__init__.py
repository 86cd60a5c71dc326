"""SecAgg+ server state machine and the in-memory driver."""
