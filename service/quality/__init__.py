"""Quality measurement with mteb (the `quality` extra): `mteb_model.GenembedEncoder` embeds through a running
gateway, `tasks` holds offline mteb tasks built from the Lee corpus that the gensim wheel ships (docs/quality.md)."""
