"""Pure data: the Plan, the cluster, the constraints, the model profile and profile files (pydantic)."""
