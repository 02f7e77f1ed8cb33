"""Quality evaluation, not serving: the offline Lee sets and ranking metrics (lee), mteb tasks built from them
(tasks) and an mteb encoder that embeds through a running gateway (mteb_model; the `quality` extra)."""
