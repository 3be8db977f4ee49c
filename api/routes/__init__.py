"""HTTP routes: thin handlers that validate, call one ``pipeline.service`` function and shape the response."""
