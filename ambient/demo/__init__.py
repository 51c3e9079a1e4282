"""The bundled multi-user agent backend served by ``ambient demo``."""
