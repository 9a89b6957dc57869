"""Causal analysis: interventions on layer activations (`gp.intervene`), activation
patching (`gp.activation_patching`) and its gradient estimate
(`gp.attribution_patching`)."""
