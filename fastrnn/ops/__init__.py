"""Backend-agnostic ops: one autograd path per op family, backends plug in underneath."""
