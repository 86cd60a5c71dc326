"""Sharded aggregation: a coordinator splits a cohort into sub-cohorts; workers run SecAgg+ on each."""
