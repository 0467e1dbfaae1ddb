"""How an offer is chosen: ``planner`` ranks offers by estimated dollars for the whole run, from the
per-GPU speed figures in ``gpu_priors``."""
