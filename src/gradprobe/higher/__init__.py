"""Higher-order and per-example methods: `gp.hvp`, `gp.jacobian`,
`gp.gradient_penalty`, `gp.per_example_norms` (and `per_example=True`)."""
