"""``extproc plan``: capacity planning and policy search on the virtual fleet (docs/plan.md)."""
