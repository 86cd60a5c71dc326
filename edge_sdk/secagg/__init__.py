"""SecAgg+ primitives and the client state machine."""
