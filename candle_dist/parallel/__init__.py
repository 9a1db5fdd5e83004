"""Class parallelism: class ranges, autograd-aware gathers, distributed cross-entropy."""
