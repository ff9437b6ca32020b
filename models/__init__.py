"""Package data: the model catalog (catalog.json). The stand-in builder beside it is a script the server never
imports."""
