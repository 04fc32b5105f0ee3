"""HTTP routes: thin handlers that parse, call a service and return a schema."""
