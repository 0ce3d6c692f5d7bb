"""MoE runtime: the carved-MoE layer (exact CMoE routing), its configuration, and the expert store."""
