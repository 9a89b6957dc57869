"""The request pipeline: selectors, targets, capture, the engine, the `Gradients`
result and its statistics, `gp.Tape`, the functional form (JAX/PyTorch), and the
private helpers every other package uses (`_validate`, `_patch`, `_sequence`)."""
