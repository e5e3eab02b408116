"""grpo_operator: the kopf operator that turns a GRPORun into one training pod, and the CRD generator."""
