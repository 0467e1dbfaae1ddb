"""The Vast.ai provider: a thin REST client (:mod:`.client`), the translation of its HTTP answers
into flux-remote errors (:mod:`.errors`) and the wait for an instance to run (:mod:`.readiness`)."""
