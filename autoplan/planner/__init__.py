"""From a profile to a Plan: the MILP solver, measured layer times, plan and explain. Never imports
measure, runtime or backends."""
