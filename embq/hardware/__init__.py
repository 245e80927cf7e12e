"""Hardware targets and the plan search (planned; see docs/design.md): specs of what a target can
serve (formats, kernels, row padding, memory tiers, cost coefficients), a probe that measures
this machine, per-table / per-layer sensitivity, and an exact search for the plan that
minimises the predicted loss under a byte or latency budget."""
