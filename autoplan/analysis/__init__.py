"""What a model is: the trace on meta tensors, its tensor-parallel, sequence-parallel and stage-cut
structure, the per-layer profile."""
