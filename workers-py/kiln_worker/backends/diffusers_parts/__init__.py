"""Pieces of the diffusers backend: settings (environment), catalog (what is on disk), residency
(what is loaded, where, evicted in LRU order) and pipelines (building and running SDXL calls).
Everything that imports torch or diffusers does so inside functions, so importing this package is
cheap and works where diffusers is absent."""
