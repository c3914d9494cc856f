"""One module per resource; each handler authorizes its own rule before doing anything."""
