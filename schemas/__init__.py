"""Package data: the JSON Schemas of every route, found through the package (`config.SCHEMAS_DIR`)."""
